"""`python -m launcher.server SPEC.pickle`: run the HTTP server (and, inside it, the engine process)."""
from __future__ import annotations

import logging
import os
import sys

from launcher.server.settings import read_launch_spec

SPEC_ENV = "LLM_SERVER_SPEC"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else os.environ.get(SPEC_ENV)
    if not path:
        print(f"usage: python -m launcher.server SPEC (or set {SPEC_ENV}); `llm serve` writes the spec",
              file=sys.stderr)
        return 2
    spec = read_launch_spec(path)
    settings = spec.settings
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # The at_start models' engines start first: each imports torch and loads weights while this process
    # imports Sanic and the handlers (~0.3 s), instead of after.
    from engine.engine_process import EngineProcess
    started = {i: EngineProcess(m.engine) for i, m in enumerate(spec.models) if m.load == "at_start"}
    for process in started.values():
        process.start()
    from launcher.server.app import build_app  # after logging is set up
    app = build_app(settings, spec.models, spec.upstreams, started=started)
    app.run(host=settings.host, port=settings.port, single_process=True, access_log=False, motd=False,
            debug=False)
    return app.ctx.state.exit_code


if __name__ == "__main__":
    sys.exit(main())
