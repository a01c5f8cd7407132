"""The served deployments under a real Prefect server, driven through the Prefect API.

`hrm server` (its own PREFECT_HOME under tmp) and `hrm serve` run as subprocesses, as a user runs them;
every flow run is started with `run_deployment(name, parameters=...)`, and the runner executes it in its
own child process. Checked: what each deployment writes and publishes, the task graph of a pipeline run,
a run killed with SIGKILL (Crashed by the runner at once; the zombie automation when the runner died
too) and its resume, and parameters refused by the deployments' schemas or failing at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId)
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.data_flow import OPTIONAL, STAGES
from flows.serve import ZOMBIE_AFTER_S, ZOMBIE_AUTOMATION
from pipeline.io import sha256_json
from pipeline.runs import read_run
from tiny_spec import TINY  # tests/flows/tiny_spec.py

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ("hrm-pipeline/pipeline", "hrm-pipeline/ablation", "hrm-stage/stage", "hrm-evaluate/evaluate",
               "hrm-lineage/lineage")
DATA_STAGES = [st for st in STAGES if st not in OPTIONAL] + ["lineage"]  # no benchmarks: no contamination stage

TRAIN = {"preset": "debug", "steps": 3, "warmup_steps": 1, "save_every": 0, "micro_batch_size": 2}
EVAL = {"limit": 3, "max_gen_toks": 8}
RUN_TIMEOUT = 900  # bound on one pipeline flow run (about a minute on two CPU cores)


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll PRED until it returns something true; fail naming WHAT after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(interval)


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A subprocess in its own process group (stopped with everything it started), output in LOG."""
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM to the process group PROC leads (SIGKILL after 20 s), then SIGKILL to whatever it started
    that is still alive (flow-run processes may sit in process groups of their own)."""
    if proc is None:
        return
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(kids, timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def base_env(home: Path, url: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT), "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)
    if url:
        env["PREFECT_API_URL"] = url
    home.mkdir(parents=True, exist_ok=True)
    return env


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log


class Runner:
    """`hrm serve` against the server; started again when a test has killed it."""

    def __init__(self, server: Server, home: Path):
        self.server, self.home, self.proc = server, home, None
        self.log = home / "serve.log"

    def ensure(self) -> "Runner":
        if self.proc is not None and self.proc.poll() is None:
            return self
        stop(self.proc)
        started = time.time()
        env = base_env(self.home, self.server.url)
        env["PREFECT_RUNNER_POLL_FREQUENCY"] = "2"  # pick up a new run in 2 s instead of 10
        env["OMP_NUM_THREADS"] = "1"  # no spinning OpenMP threads fighting over a small shared machine
        self.proc = start([sys.executable, "-m", "pipeline.cli", "serve"], env, self.log)

        def ready() -> bool:
            assert self.proc.poll() is None, f"hrm serve exited with {self.proc.returncode}:\n{tail(self.log)}"
            r = httpx.post(f"{self.server.url}/deployments/filter", json={}, timeout=10)
            polled = {d["name"]: d.get("last_polled") for d in r.json()}
            names = {n.split("/")[1] for n in DEPLOYMENTS}
            return names <= set(polled) and all(
                polled[n] and _ts(polled[n]) >= started for n in names)

        wait_for(ready, 180, "deployments served by hrm serve")
        return self

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`hrm server` on a free port of 127.0.0.1, its database under a PREFECT_HOME of its own."""
    home = tmp_path_factory.mktemp("prefect-server")
    log = home / "server.log"
    proc = None
    try:
        for _ in range(3):  # a port taken between choosing and binding it: try another
            port = free_port()
            url = f"http://127.0.0.1:{port}/api"
            proc = start([sys.executable, "-m", "pipeline.cli", "server", "--port", str(port)], base_env(home), log)

            def up() -> bool:
                if proc.poll() is not None:
                    return True
                try:
                    return httpx.get(f"{url}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, 180, f"Prefect server on {url}")
            if proc.poll() is None:
                break
        assert proc is not None and proc.poll() is None, f"hrm server did not start:\n{tail(log)}"
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield Server(url, proc, log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    r = Runner(server, tmp_path_factory.mktemp("prefect-serve"))
    try:
        yield r
    finally:
        stop(r.proc)


@pytest.fixture
def runner(served) -> Runner:
    return served.ensure()


# ------------------------------------------------------------------------------------------------
# API helpers
# ------------------------------------------------------------------------------------------------
def logs_of(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as c:
        return [x.message for x in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def run(name: str, params: dict, timeout: float = RUN_TIMEOUT, runner: Runner | None = None):
    """Start deployment NAME with PARAMS through the API and wait for a final state (bounded)."""
    fr = run_deployment(name, parameters=params, timeout=timeout, poll_interval=1)
    if not fr.state.is_final():
        msg = f"{name} run {fr.id} still {fr.state.type} after {timeout} s"
        if runner is not None:
            msg += f"\nserve log:\n{tail(runner.log)}"
        raise AssertionError(msg)
    return fr


def completed(name: str, params: dict, runner: Runner, timeout: float = RUN_TIMEOUT):
    fr = run(name, params, timeout, runner)
    assert fr.state.is_completed(), (f"{name}: {fr.state.type} {fr.state.message}\n"
                                     + "\n".join(logs_of(fr.id)[-30:]))
    return fr


def state_of(flow_run_id):
    with get_client(sync_client=True) as c:
        return c.read_flow_run(flow_run_id).state


def task_runs(flow_run_id, expect: set[str], timeout: float = 60.0) -> dict[str, Any]:
    """The flow run's task runs by task name (the last run of each name), once EXPECT are all final:
    task-run states reach the API through Prefect's event pipeline, after the flow run ends."""
    def settled():
        with get_client(sync_client=True) as c:
            trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        out = {tr.name.rsplit("-", 1)[0]: tr for tr in sorted(trs, key=lambda t: t.created)}
        ok = set(out) >= expect and all(tr.state is not None and tr.state.is_final() for tr in trs)
        return out if ok else None

    return wait_for(settled, timeout, f"final task runs {sorted(expect)} of flow run {flow_run_id}")


def artifacts_of(flow_run_id) -> dict[str, Any]:
    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def subflow_runs(flow_run_id) -> list:
    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
            any_=[flow_run_id])))


def inputs_from(tr, param: str) -> set:
    return {getattr(x, "id", None) for x in tr.task_inputs.get(param, [])}


def label_of(root: Path, spec_name: str = "tiny") -> str:
    """The artifact-key label of a run folder (flows.data_flow.run_label)."""
    return f"{spec_name}-{sha256_json(str(root.resolve()))[:8]}"


def heartbeats(server: Server, flow_run_id) -> list[dict]:
    r = httpx.post(f"{server.url}/events/filter", timeout=10, json={
        "filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                   "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
                   "occurred": {"since": "2000-01-01T00:00:00Z"}},
        "limit": 50})
    r.raise_for_status()
    return r.json().get("events", [])


def flow_process(runner: Runner, flow_run_id, run_dir: Path) -> psutil.Process:
    """The runner's child process executing FLOW_RUN_ID: the child whose environment names the flow run,
    else the parent of the trainer writing RUN_DIR, else the most recent child."""
    kids = psutil.Process(runner.pid()).children()
    for k in kids:
        try:
            if k.environ().get("PREFECT__FLOW_RUN_ID") == str(flow_run_id):
                return k
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    for k in kids:
        for g in k.children(recursive=True):
            if any(a.startswith(str(run_dir)) for a in g.cmdline()):
                return k
    assert kids, "the runner has no child process"
    return max(kids, key=lambda p: p.create_time())


def trainers(run_dir: Path) -> list[psutil.Process]:
    """`python -m training` processes writing under RUN_DIR."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "training" in cmd and any(a.startswith(str(run_dir)) for a in cmd):
            out.append(p)
    return out


def read_metrics(train_dir: Path) -> list[int]:
    steps = []
    for line in (train_dir / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    p.write_text(TINY)
    return p


# ------------------------------------------------------------------------------------------------
# 1. every deployment, started through the API with parameters
# ------------------------------------------------------------------------------------------------
def test_deployments_run_through_the_api(runner, tiny, tmp_path):
    root = (tmp_path / "run").resolve()
    label = label_of(root)

    # the pipeline: data stages, training, evaluation, report
    fr = completed("hrm-pipeline/pipeline", {"spec": str(tiny), "output_dir": str(root), "train": TRAIN,
                                             "evaluation": EVAL}, runner)
    run_rec = read_run(root)
    assert set(run_rec["stages"]) == set(DATA_STAGES), run_rec["stages"].keys()
    assert run_rec["train"]["status"] == "done" and run_rec["train"]["settings"]["steps"] == 3
    assert run_rec["train"]["step"] == run_rec["train"]["steps"] == 3  # the trainer's fields survive the flow's
    assert run_rec["train"]["pack_version"] == run_rec["stages"]["pack"]["version"]
    raw = root / run_rec["train"]["final"]["raw"]
    assert raw == root / run_rec["train"]["dir"] / "final" / "raw" and (raw / "model.safetensors").is_file()
    assert raw.parent.parent.parent == root / "train"
    assert run_rec["check"]["pack_version"] == run_rec["stages"]["pack"]["version"]  # the held-out task, checked
    (ev,) = run_rec["evaluations"]
    assert ev["checkpoint"] == run_rec["train"]["final"]["raw"] and ev["limited"] and ev["n"] == {"demo_heldout": 3}
    assert ev["contamination"] == run_rec["check"]["dir"]
    results = json.loads((root / ev["results"]).read_text())
    assert results["tasks"]["demo_heldout"]["n"] == 3 and results["limit"] == 3
    assert (root / "report" / "index.html").is_file() and (root / "report" / "report.json").is_file()

    # the task graph: inputs traced to the task runs that produced them
    trs = task_runs(fr.id, {*DATA_STAGES, "train", "check", "evaluate", "report"})
    assert all(tr.state.is_completed() for tr in trs.values()), {k: v.state.name for k, v in trs.items()}
    ids = {k: v.id for k, v in trs.items()}
    assert inputs_from(trs["normalize"], "ingest_dir") == {ids["ingest"]}
    assert inputs_from(trs["pack"], "tokenized_dir") == {ids["tokenizer"]}
    assert inputs_from(trs["pack"], "mix_dir") == {ids["mix"]}
    assert ids["pack"] in inputs_from(trs["lineage"], "stage_dirs")
    assert inputs_from(trs["train"], "pack_dir") == {ids["pack"]}, trs["train"].task_inputs
    assert inputs_from(trs["check"], "pack_dir") == {ids["pack"]}, trs["check"].task_inputs
    assert inputs_from(trs["evaluate"], "contamination") == {ids["check"]}, trs["evaluate"].task_inputs
    assert ids["train"] in inputs_from(trs["evaluate"], "checkpoint") | inputs_from(trs["evaluate"], "wait_for"), \
        trs["evaluate"].task_inputs
    assert {ids["train"], ids["evaluate"]} <= inputs_from(trs["report"], "after")

    # the artifacts it published: every key names this run folder
    arts = artifacts_of(fr.id)
    want = {f"{k}-{label}" for k in (*DATA_STAGES, "data-run", "train-progress", "train-loss", "check", "scores",
                                     "report")}
    assert set(arts) == want, sorted(arts)
    assert "demo_heldout" in arts[f"scores-{label}"].data
    assert arts[f"train-progress-{label}"].data == 100.0

    # evaluate: the trained checkpoint, scored into another folder
    ev_out = (tmp_path / "eval-again").resolve()
    fr_ev = completed("hrm-evaluate/evaluate", {"checkpoint": str(raw), "output_dir": str(ev_out),
                                                "settings": {**EVAL, "limit": 2}}, runner)
    res = json.loads((ev_out / "results.json").read_text())
    assert res["checkpoint"] == str(raw) and res["tasks"]["demo_heldout"]["n"] == 2
    (key,) = artifacts_of(fr_ev.id)
    assert key == f"scores-eval-again-{sha256_json(str(ev_out))[:8]}" and key not in arts

    # lineage: one removed and one packed row of the run's lineage version
    rows = pq.read_table(root / run_rec["stages"]["lineage"]["dir"] / "lineage.parquet").to_pylist()
    removed = next(r for r in rows if r["status"] == "removed")
    packed = next(r for r in rows if r["status"] == "packed")
    for row, words in ((removed, [f"removed at {removed['stage']}", removed["reason"], removed["duplicate_of"]]),
                       (packed, ["packed", "step 3/3"])):
        fr_l = completed("hrm-lineage/lineage", {"run_dir": str(root), "row_id": row["id"]}, runner)
        (a,) = artifacts_of(fr_l.id).values()
        assert a.key.startswith(f"lineage-why-run-{sha256_json(str(root))[:8]}-"), a.key  # unique to the run folder
        assert a.data.startswith(f"# `{row['id']}`"), a.data[:200]
        for w in words:
            assert w and w in a.data, (w, a.data)
        wait_for(lambda: any(words[0] in m for m in logs_of(fr_l.id)), 30, "lineage answer in the flow logs")

    # stage: dedup alone, with an override, on the latest outputs of the run
    before = read_run(root)["stages"]["dedup"]["version"]
    fr_s = completed("hrm-stage/stage", {"stage": "dedup", "spec": str(tiny), "output_dir": str(root),
                                         "overrides": ["dedup.threshold=0.5"]}, runner)
    after = read_run(root)
    assert after["stages"]["dedup"]["version"] != before and after["spec"]["dedup"]["threshold"] == 0.5
    assert {st for st, e in after["stages"].items() if e.get("stale")} == {"tokenizer", "mix", "pack", "lineage"}
    (sub,) = subflow_runs(fr_s.id)  # the stage flow runs the pipeline flow on one step
    assert set(task_runs(sub.id, {"dedup"})) == {"dedup"}
    assert set(artifacts_of(sub.id)) == {f"dedup-{label}", f"data-run-{label}"}


# ------------------------------------------------------------------------------------------------
# 2. a served run killed with SIGKILL: Crashed, and the rerun resumes from its checkpoint
# ------------------------------------------------------------------------------------------------
def test_killed_run_is_crashed_and_the_rerun_resumes(runner, server, tiny, tmp_path):
    from prefect.automations import Automation

    auto = Automation.read(name=ZOMBIE_AUTOMATION)  # installed by hrm server / hrm serve
    trig = auto.trigger
    assert trig.posture == "Proactive" and trig.after == {"prefect.flow-run.heartbeat"}
    assert "prefect.flow-run.heartbeat" in trig.expect and "prefect.flow-run.Completed" in trig.expect
    assert trig.within.total_seconds() == ZOMBIE_AFTER_S and trig.for_each == {"prefect.resource.id"}
    assert [a.type for a in auto.actions] == ["change-flow-run-state"] and auto.actions[0].state.value == "CRASHED"

    root = (tmp_path / "run").resolve()
    params = {"spec": str(tiny), "output_dir": str(root), "evaluation": EVAL,
              "train": {**TRAIN, "steps": 120, "save_every": 10}}
    fr = run_deployment("hrm-pipeline/pipeline", parameters=params, timeout=0)
    try:
        def training_checkpointed():
            st = state_of(fr.id)
            assert not st.is_final(), f"the run ended before it could be killed: {st.type} {st.message}"
            latest = list((root / "train").glob("*/checkpoints/latest")) if (root / "train").exists() else []
            return st.is_running() and latest and latest[0].parent.parent
        train_dir = wait_for(training_checkpointed, RUN_TIMEOUT, "Running flow run with a training checkpoint", 0.2)
        proc = flow_process(runner, fr.id, root)
        assert proc.ppid() == runner.pid()
        trainer = trainers(root)
        assert [t.ppid() for t in trainer] == [proc.pid], trainer
        proc.send_signal(signal.SIGKILL)
    except BaseException:
        stop(runner.proc)  # leave no run going for the next test (which starts hrm serve again)
        raise

    # the runner sees its child die and reports the run Crashed; the trainer died with the flow's process
    st = wait_for(lambda: (s := state_of(fr.id)).is_final() and s, 60, "final state of the killed run")
    assert st.is_crashed() and "SIGKILL" in (st.message or ""), (st.type, st.message)
    wait_for(lambda: not any(t.is_running() and t.status() != psutil.STATUS_ZOMBIE for t in trainer), 30,
             "end of the orphaned trainer")
    assert not trainers(root)
    done = read_metrics(train_dir)
    assert 10 <= len(done) < 120 and not (train_dir / "final").exists()
    # heartbeats went out, so the zombie automation covers such a run if the runner dies too (test below)
    wait_for(lambda: heartbeats(server, fr.id), 30, "heartbeat event of the killed run")

    # the same parameters again: training resumes from the checkpoint the killed run left
    fr2 = completed("hrm-pipeline/pipeline", params, runner)
    rec = json.loads((train_dir / "train.json").read_text())
    assert rec["resumed_from"] and rec["start_step"] >= 10 and rec["start_step"] % 10 == 0, rec
    assert read_metrics(train_dir) == list(range(1, 121))  # continues from the checkpoint step, no gap or repeat
    assert (train_dir / "final" / "raw" / "model.safetensors").is_file()
    wait_for(lambda: any("resuming from" in m and f"at step {rec['start_step']}" in m for m in logs_of(fr2.id)), 30,
             "log line of the resumed training")
    assert read_run(root)["train"]["status"] == "done"


# ------------------------------------------------------------------------------------------------
# 3. bad parameters: refused by the parameter schema, or a one-line failure at once
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params,field", [
    ("hrm-pipeline/pipeline", {"train": {"steps": 0}}, "train.steps"),
    ("hrm-pipeline/pipeline", {"train": {"stepz": 3}}, "'stepz' was unexpected"),
    ("hrm-pipeline/pipeline", {"refresh": ["dedupe"]}, "refresh"),
    ("hrm-pipeline/pipeline", {"evaluation": {"limit": 0}}, "evaluation.limit"),
    ("hrm-stage/stage", {"stage": "dedupe"}, "stage"),
    ("hrm-pipeline/ablation", {"preset": "huge"}, "preset"),
    ("hrm-pipeline/ablation", {"settings": {"budget_tokens": 0}}, "settings.budget_tokens"),
    ("hrm-lineage/lineage", {"run_dir": "x", "row_id": "y", "mode": "how"}, "mode"),
])
def test_bad_parameters_are_refused_by_the_schema(runner, name, params, field, tmp_path):
    with pytest.raises(PrefectHTTPStatusError, match="409") as e:
        run_deployment(name, parameters={"output_dir": str(tmp_path / "run"), **params} if "lineage" not in name
                       else params, timeout=0)
    assert field in e.value.response.json()["detail"], e.value.response.json()
    assert not (tmp_path / "run").exists()


def test_bad_values_fail_at_once_with_one_line(runner, tiny, tmp_path):
    root = tmp_path / "run"
    for params, first_line, extra in [
        ({"overrides": ["dedup.threshold=high"]}, "SpecError: ", "dedup.threshold"),
        ({"from_stage": "dedup", "only": "mix"}, "ValueError: give either from_stage (--from) or only (--only), "
                                                 "not both", None),
        ({"benchmarks": str(tmp_path / "nope")}, f"FileNotFoundError: benchmarks: {tmp_path / 'nope'} is not a "
                                                  "folder", None),
    ]:
        fr = run("hrm-pipeline/pipeline", {"spec": str(tiny), "output_dir": str(root), **params}, 300, runner)
        msg = fr.state.message or ""
        assert fr.state.is_failed() and first_line in msg.splitlines()[0], (fr.state.type, msg)
        if extra is None:
            assert len(msg.splitlines()) == 1, msg  # one line, no traceback
        else:
            assert extra in msg and "Traceback" not in msg, msg
        with get_client(sync_client=True) as c:
            assert not c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id]))), \
                "a task ran before the check"
        assert not root.exists()


# ------------------------------------------------------------------------------------------------
# 4. the runner dies with its run: the zombie automation marks the run Crashed (last: restarts serve)
# ------------------------------------------------------------------------------------------------
def test_zombie_automation_crashes_a_run_whose_runner_died(runner, server, tiny, tmp_path):
    root = (tmp_path / "run").resolve()
    fr = run_deployment("hrm-pipeline/pipeline", timeout=0, parameters={
        "spec": str(tiny), "output_dir": str(root), "train": {**TRAIN, "steps": 100000}})
    wait_for(lambda: state_of(fr.id).is_running() and heartbeats(server, fr.id), 120, "Running flow run with a "
             "heartbeat", 0.3)
    kids = psutil.Process(runner.pid()).children(recursive=True)
    os.killpg(runner.pid(), signal.SIGKILL)  # the runner and its flow-run process: nobody left to report
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    runner.proc.wait(timeout=30)
    psutil.wait_procs(kids, timeout=30)
    assert state_of(fr.id).is_running()
    # the automation fires ZOMBIE_AFTER_S after the last heartbeat; allow for its evaluation loop
    st = wait_for(lambda: (s := state_of(fr.id)).is_final() and s, ZOMBIE_AFTER_S + 120,
                  "Crashed state from the zombie automation", 2)
    assert st.is_crashed() and st.message and "no heartbeat" in st.message, (st.type, st.message)
