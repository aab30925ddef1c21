"""Tensor parallel across processes: rank 0 (the engine core) starts the other ranks, and before each step
sends them the step's plan; every rank runs the same ModelRunner on it, paired up by the all-reduces
inside the layers. Only rank 0 schedules, samples and keeps requests.

The plan goes over one pipe per worker (pickled int64 arrays, as vLLM v1 hands its workers the scheduler
output over a message queue rather than a collective): a worker waits on its pipe for as long as the engine
idles, with no collective timeout to outlast, and sees EOF the moment rank 0 is gone, however it died.
The collectives (torch.distributed, default group) carry only the model's all-reduces and the KV-block count.

`python -m engine.tp_worker FD`: FD is the pipe's read end; the first message is the worker's RankSetup.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from engine.config import TP_WORKER_FLAG, EngineConfig, ModelConfig
from engine.messages import FatalStepError
from engine.model_runner import ModelOutput, ModelRunner
from engine.models.parallel import TensorParallel, check_size
from engine.scheduler import Batch
from engine.startup import StartupError
from engine.step_plan import StepPlan

log = logging.getLogger("llm.engine")

# A collective that a live rank never joins fails after this long. A dead rank fails it at once (its
# sockets close; measured: ~1 ms with gloo), so this only bounds a hung rank, and rank 0's wait while the
# workers load their weights (the KV-block all-reduce follows the loading).
COLLECTIVE_TIMEOUT_S = 300.0
WORKER_EXIT_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class RankSetup:
    """What a worker needs to join: sent as the first message on its pipe."""
    config: EngineConfig
    rank: int
    init_method: str          # tcp://127.0.0.1:PORT, rank 0's store
    backend: str              # 'gloo' | 'nccl'


def pick_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name not in ("nccl", "gloo"):
        raise ValueError(f"unknown distributed backend {name!r}: use auto, nccl or gloo")
    return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(setup: RankSetup) -> None:
    import torch.distributed as dist
    dist.init_process_group(setup.backend, init_method=setup.init_method, rank=setup.rank,
                            world_size=setup.config.tensor_parallel_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def agree_num_blocks(num_blocks: int, device: torch.device) -> int:
    """The KV blocks every rank can hold: the smallest count (each rank sized its own budget)."""
    import torch.distributed as dist
    t = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def rank_device(device: torch.device, rank: int) -> torch.device:
    """One GPU per rank; the CPU is shared."""
    if device.type != "cuda":
        return device
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


class TensorParallelGroup:
    """Rank 0's side: the worker processes, their plan pipes, and the process group.
    NOTE: one per process: torch.distributed's default group is global (each engine is its own process)."""

    def __init__(self, config: EngineConfig, device: torch.device):
        self.size = config.tensor_parallel_size
        self.shard = TensorParallel(0, self.size)
        self.device = device
        self.backend = pick_backend(config.distributed_backend, device)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.processes: list[subprocess.Popen] = []
        self._pipes: list[Connection] = []
        self._broken: str | None = None
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])   # workers import `engine` from where we found it
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            for rank in range(1, self.size):
                read_end, write_end = os.pipe()
                try:
                    self.processes.append(subprocess.Popen(worker_command(read_end), env=env, pass_fds=(read_end,),
                                                           stdin=subprocess.DEVNULL))
                finally:
                    os.close(read_end)   # only the worker holds it: its EOF is our exit, whatever the cause
                pipe = Connection(write_end, readable=False)
                self._pipes.append(pipe)
                pipe.send(RankSetup(config, rank, init_method, self.backend))
            self._join(RankSetup(config, 0, init_method, self.backend))
        except BaseException:
            self.close()
            raise

    def _join(self, setup: RankSetup) -> None:
        """Rank 0 joins the group while watching the workers: one that exits before joining (a bad install, a
        crash on import) is a StartupError now, not after the rendezvous' COLLECTIVE_TIMEOUT_S."""
        done, failure = threading.Event(), []

        def join() -> None:
            try:
                _init_process_group(setup)
            except BaseException as e:   # noqa: BLE001 - handed to the waiting thread
                failure.append(e)
            finally:
                done.set()

        # NOTE: a daemon thread: when a worker died, the rendezvous it is stuck in is left behind (the engine
        # process exits on the StartupError)
        threading.Thread(target=join, name="tp-join", daemon=True).start()
        while not done.wait(0.05):
            dead = self._dead()
            if dead:
                raise StartupError(f"{dead} before joining the tensor-parallel group; its log above says why")
        if failure:
            raise failure[0]

    @classmethod
    def start(cls, config: EngineConfig, model_config: ModelConfig, device: torch.device) -> "TensorParallelGroup":
        """Start the other ranks and join them; a size that does not split the model is a StartupError naming
        the sizes that do."""
        try:
            check_size(model_config, config.tensor_parallel_size)
        except ValueError as e:
            raise StartupError(str(e)) from None
        if device.type == "cuda" and torch.cuda.device_count() < config.tensor_parallel_size:
            raise StartupError(f"tensor_parallel_size={config.tensor_parallel_size} needs a GPU per rank; torch "
                               f"sees {torch.cuda.device_count()}")
        return cls(config, device)

    def agree_num_blocks(self, num_blocks: int) -> int:
        try:
            return agree_num_blocks(num_blocks, self.device)
        except RuntimeError as e:
            raise RuntimeError(f"a tensor-parallel worker failed during startup ({self._dead() or e}); "
                               "its log above says why") from None

    def check_alive(self) -> None:
        """Raise FatalStepError when a worker has exited (or an earlier step broke the group)."""
        dead = self._broken or self._dead()
        if dead:
            self._broken = dead
            raise FatalStepError(dead)

    def _dead(self) -> str | None:
        for rank, p in enumerate(self.processes, start=1):
            code = p.poll()
            if code is not None:
                return f"tensor-parallel worker {rank} (pid {p.pid}) exited with code {code}"
        return None

    def send(self, plan: StepPlan) -> None:
        data = pickle.dumps(plan.for_workers(), protocol=pickle.HIGHEST_PROTOCOL)
        for pipe in self._pipes:
            pipe.send_bytes(data)

    def fail(self, error: BaseException) -> FatalStepError:
        """The group after a failed step: the ranks are out of step for good. Names the dead worker when
        one died (its sockets close a moment before its exit status is there to read)."""
        deadline = time.monotonic() + 1.0
        while (dead := self._dead()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        first_line = (str(error).splitlines() or [""])[0]
        self._broken = dead or f"tensor-parallel step failed: {type(error).__name__}: {first_line}"
        return FatalStepError(self._broken)

    def close(self) -> None:
        """EOF to every worker (they exit), then reap them; a worker that does not exit is killed."""
        for pipe in self._pipes:
            pipe.close()
        self._pipes = []
        deadline = time.monotonic() + WORKER_EXIT_WAIT_S
        for p in self.processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.processes = []
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


class TensorParallelRunner:
    """Rank 0's runner: the same ModelRunner, with each step's plan sent to the workers first."""

    def __init__(self, runner: ModelRunner, group: TensorParallelGroup):
        self.runner = runner
        self.group = group

    def execute(self, batch: Batch) -> ModelOutput:
        self.group.check_alive()
        plan = self.runner.plan(batch)
        try:
            self.group.send(plan)
            return self.runner.execute_plan(plan)
        except Exception as e:  # any failure mid-step leaves the ranks out of step: never recoverable
            raise self.group.fail(e) from e

    def __getattr__(self, name: str):
        return getattr(self.runner, name)   # num_blocks, kv_caches, model ... as the plain runner has them


# -- the worker process ----------------------------------------------------------------------------


def worker_command(read_fd: int) -> list[str]:
    if getattr(sys, "frozen", False):   # the packaged build: see launcher/frozen.py
        return [sys.executable, TP_WORKER_FLAG, str(read_fd)]
    return [sys.executable, "-m", "engine.tp_worker", str(read_fd)]


def _exit_with_parent() -> None:
    """Exit when rank 0's process is gone even if we are not reading the pipe (loading weights)."""
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def build_worker_runner(setup: RankSetup) -> ModelRunner:
    """Everything rank 0's EngineCore builds for the model, in the same order (the collectives pair up)."""
    from engine.loader import ModelFiles, load_config, load_model
    from engine.startup import initial_max_model_len, num_kv_blocks, pick_device, pick_dtype, pick_kv_dtype
    config = setup.config
    tp = TensorParallel(setup.rank, config.tensor_parallel_size)
    device = rank_device(pick_device(config.device), setup.rank)
    files = ModelFiles.at(config.model)
    model_config = load_config(files)
    dtype = pick_dtype(config.dtype, device)
    max_model_len = initial_max_model_len(config, model_config)
    model = load_model(files, model_config, dtype, device, max_positions=max_model_len,
                       cpu_kernels=config.cpu_kernels, float_copies=config.cpu_float_copies,
                       quantized_activations=config.cpu_quantized_activations, tp=tp)
    kv_dtype = pick_kv_dtype(config.kv_cache_dtype, dtype, device, model)
    num_blocks = num_kv_blocks(config, ModelRunner.kv_bytes_per_block(model_config, config.block_size, kv_dtype, tp),
                               device)
    num_blocks = agree_num_blocks(num_blocks, device)
    runner = ModelRunner(model, model_config, num_blocks, config.block_size, kv_dtype, device, max_model_len, tp)
    if device.type == "cuda":
        runner.warm_up(config, max_model_len)   # the same kernel configs as rank 0 (no graphs with tp > 1)
    return runner


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="llm tp worker: %(message)s")
    pipe = Connection(int(argv[0]), writable=False)
    setup: RankSetup = pipe.recv()
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    if setup.config.num_threads:
        torch.set_num_threads(setup.config.num_threads)
    _init_process_group(setup)
    runner = build_worker_runner(setup)
    while True:
        try:
            data = pipe.recv_bytes()
        except EOFError:
            break   # rank 0 closed the pipe or is gone
        try:
            runner.forward(pickle.loads(data))
        except RuntimeError as e:   # a peer died mid-step: rank 0 reports it; nothing left to do here
            log.warning("rank %d stops: %s", setup.rank, str(e).splitlines()[0] if str(e) else type(e).__name__)
            sys.exit(1)
    import torch.distributed as dist
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
