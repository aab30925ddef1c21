"""Entry point of the packaged build (PyInstaller, scripts/build_executable): one executable that is the
`llm` CLI, the server process (`llm --llm-server SPEC`, started by `llm serve`) and the engine process
(multiprocessing's spawn re-enters here). The packaged build is for air-gapped hosts: offline by
default (set LLM_OFFLINE=0 to allow downloads)."""
from __future__ import annotations

import multiprocessing
import os
import sys

from launcher.supervise import SERVER_FLAG


def main() -> None:
    multiprocessing.freeze_support()   # a spawned engine process runs its target and exits here
    if len(sys.argv) >= 2 and sys.argv[1] == SERVER_FLAG:
        from launcher.server.__main__ import main as server_main
        sys.exit(server_main(sys.argv[2:]))
    os.environ.setdefault("LLM_OFFLINE", "1")
    from launcher.cli import main as cli_main
    cli_main()


if __name__ == "__main__":
    main()
