"""`llm serve` with [distributed] replicas > 1 (or auto): one server per engine as Ray Serve replicas behind
Serve's HTTP proxy on the profile's address. Ray is imported here only, and only then."""
from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from launcher.profile import DistributedSection, Profile
from launcher.ray_replica import LLMReplica
from launcher.server.settings import LaunchSpec
from launcher.supervise import local_url, prepare_launch, ready_line

APP_NAME = "llm"
RAY_MISSING = "llm serve: [distributed] replicas needs Ray Serve, which is not installed: pip install 'llm-serve[ray]'"
_HEALTH_CHECK_PERIOD_S = 2.0
_POLL_S = 0.25
_STARTUP_FAILED = re.compile(r" -- (the engine could not start|startup failed): ")   # lifecycle._fail's lines


class _Stop(Exception):
    """A signal arrived while Serve was still deploying."""


def serve_replicas(profile: Profile) -> int:
    """Deploy the replicas, print the ready line, serve until SIGINT/SIGTERM; Serve and a Ray we started stop
    with us. Returns the exit status."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print(RAY_MISSING, file=sys.stderr)
        return 1
    spec = prepare_launch(profile)
    if spec is None:
        return 1
    d = profile.distributed
    started = time.monotonic()
    url = local_url(spec.settings.host, spec.settings.port)
    stopping = {"signal": None, "deploying": True}

    def on_signal(signum, _frame) -> None:
        if stopping["signal"] is None:
            stopping["signal"] = signum
            if stopping["deploying"]:
                raise _Stop()   # out of serve.run's wait; the finally below takes everything down

    print(f"llm: starting Ray ({d.ray_address or 'a local cluster'}) ...", file=sys.stderr, flush=True)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        # NOTE: "local" always starts a new cluster, owned (and stopped) by us, even if RAY_ADDRESS is set.
        ray.init(address=d.ray_address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        for sig in previous:   # after ray.init, which installs a SIGTERM handler of its own
            signal.signal(sig, on_signal)
        options = deployment_options(d, spec, ray.cluster_resources())
        print(f"llm: deploying {_describe(d)} on Ray Serve, each {options['ray_actor_options']} ...",
              file=sys.stderr, flush=True)
        serve.start(http_options={"host": spec.settings.host, "port": spec.settings.port})
        deployment = serve.deployment(name="LLMServer", **options)(serve.ingress()(LLMReplica))
        serve.run(deployment.bind(spec), name=APP_NAME, route_prefix="/")   # waits until every replica started
        stopping["deploying"] = False
        ready = _ready_through_proxy(url, stopping)
        if ready is not None:
            print(ready_line(spec, ready, url, time.monotonic() - started), flush=True)
        while stopping["signal"] is None:
            time.sleep(_POLL_S)
    except _Stop:
        pass
    except RuntimeError as e:   # serve.run: the deployment failed (a replica could not start)
        why = _replica_error(ray) or f"{_first_line(e)} (replica logs: the Ray session's logs/serve folder)"
        print(f"llm serve: Ray Serve could not deploy the replicas: {why}", file=sys.stderr)
        code = 1
    finally:
        _shut_down(ray, serve, owns_cluster=not d.ray_address)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        print("llm: server stopped", file=sys.stderr)
    return code


def deployment_options(d: DistributedSection, spec: LaunchSpec, cluster: dict[str, float]) -> dict:
    """serve.deployment keyword arguments: how many replicas (or how they scale) and what each reserves."""
    on_cpu = all(m.engine.device == "cpu" for m in spec.models) or \
        (cluster.get("GPU", 0) == 0 and all(m.engine.device in ("cpu", "auto") for m in spec.models))
    if on_cpu:
        # NOTE: Ray sets OMP_NUM_THREADS to a replica's CPUs (1 when unset), and the engine process inherits
        # it: reserving a share of the cores is what gives each engine its torch threads.
        most = d.max_replicas if d.replicas == "auto" else d.replicas
        actor = {"num_cpus": max(1, int(cluster.get("CPU", 1)) // most)}
    else:
        # a replica holds every model, each on its own tensor_parallel_size GPUs
        actor = {"num_cpus": 1, "num_gpus": sum(m.engine.tensor_parallel_size for m in spec.models)}
    options = {"ray_actor_options": actor, "health_check_period_s": _HEALTH_CHECK_PERIOD_S,
               "health_check_timeout_s": 30.0, "graceful_shutdown_timeout_s": 15.0,
               # our own admission limit (max_queued_requests) answers 503 past it, not Serve's default of 5
               "max_ongoing_requests": spec.settings.max_queued_requests}
    if d.replicas == "auto":
        options["autoscaling_config"] = {"min_replicas": d.min_replicas, "max_replicas": d.max_replicas,
                                         "initial_replicas": d.min_replicas,
                                         "target_ongoing_requests": d.target_ongoing_requests}
    else:
        options["num_replicas"] = d.replicas
    return options


def _describe(d: DistributedSection) -> str:
    if d.replicas == "auto":
        return (f"{d.min_replicas} to {d.max_replicas} replicas (autoscaled at {d.target_ongoing_requests:g} "
                "requests in flight each)")
    return f"{d.replicas} replicas"


def _ready_through_proxy(url: str, stopping: dict) -> dict | None:
    """The ready body of /health/ready through Serve's proxy (every replica's engine is up by now)."""
    while stopping["signal"] is None:
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(_POLL_S)   # the proxy may still be binding its port
    return None


def _shut_down(ray, serve, owns_cluster: bool) -> None:
    """Stop the replicas (each shuts its engine down), then Serve and the Ray we started; leave a cluster we
    joined running, less our application."""
    if not ray.is_initialized():
        return
    try:
        if owns_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as e:  # Ray itself may be gone; ray.shutdown below still cleans up our side
        print(f"llm: stopping Ray Serve: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
    ray.shutdown()


def _replica_error(ray) -> str | None:
    """Why a replica failed to start, from the replicas' logs: Serve's own error says only that the ASGI
    lifespan startup failed, while our lifecycle logged the engine's one-line reason there."""
    try:   # NOTE: Ray has no public accessor for the session folder; without it the caller says where to look
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
        found = [line.split(" -- ", 1)[1] for path in sorted(logs.glob("replica_*.log"))
                 for line in path.read_text(errors="replace").splitlines() if _STARTUP_FAILED.search(line)]
    except (AttributeError, OSError):
        return None
    return found[-1] if found else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
