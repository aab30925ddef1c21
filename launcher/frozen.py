"""Entry point of the packaged build (PyInstaller, scripts/build_executable): one executable that is the
`llm` CLI, the server process (`llm --llm-server SPEC`, started by `llm serve`), the engine process
(`llm --llm-engine-core FD FD`, started by the server) and its tensor-parallel workers (`llm --llm-tp-worker
FD`). The packaged build is for air-gapped hosts: offline by default (set LLM_OFFLINE=0 to allow downloads)."""
from __future__ import annotations

import os
import sys

from engine.config import TP_WORKER_FLAG
from engine.engine_process import ENGINE_FLAG
from launcher.supervise import SERVER_FLAG


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == ENGINE_FLAG:
        from engine.core_process import main as engine_main
        engine_main(sys.argv[2:])
        sys.exit(0)
    if len(sys.argv) >= 2 and sys.argv[1] == TP_WORKER_FLAG:
        from engine.tp_worker import main as worker_main
        worker_main(sys.argv[2:])
        sys.exit(0)
    if len(sys.argv) >= 2 and sys.argv[1] == SERVER_FLAG:
        from launcher.server.__main__ import main as server_main
        sys.exit(server_main(sys.argv[2:]))
    os.environ.setdefault("LLM_OFFLINE", "1")
    from launcher.cli import main as cli_main
    cli_main()


if __name__ == "__main__":
    main()
