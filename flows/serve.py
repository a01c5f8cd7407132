"""Deployments for the Prefect UI (`hrm serve`), a local Prefect server (`hrm server`) and the automation
that marks dead runs Crashed.

Deployments (each with a Run button and a typed parameter form in the UI):
  hrm-pipeline/pipeline         raw data to scores: spec, overrides, from/only/refresh/stop_after, train
                                settings (preset, steps, ...), benchmarks, evaluation settings (limit, ...)
  hrm-pipeline/ablation         the paper's ablation ladder (Transformer full LM loss -> answer-only -> PrefixLM
                                -> HRM) on a spec's data: preset cpu/gpu/tiny, budget, match tokens/flops
  hrm-stage/stage               one step of a run on the latest outputs of the steps before it
  hrm-evaluate/evaluate         evaluate a checkpoint (lm-eval; full and clean-subset scores)
  hrm-lineage/lineage           `hrm lineage trace|why` for one row id, answered as a markdown artifact

Flow runs of served deployments send heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, 30 s unless set),
and `install_zombie_automation` creates (once, by name) Prefect's documented automation that marks a
run Crashed when its heartbeats stop: a run whose process was killed does not stay Running forever.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Literal, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline.io import sha256_json

from .data_flow import artifact_key
from .ablation_flow import ablation
from .pipeline_flow import EvalSettings, StageName, TrainSettings, pipeline

ZOMBIE_AUTOMATION = "hrm: mark runs without heartbeats Crashed"
HEARTBEAT_S = 30
ZOMBIE_AFTER_S = 90


@flow(name="hrm-stage", log_prints=True)
def stage_flow(stage: StageName, spec: str = "demo", output_dir: Optional[str] = None,
               overrides: list[str] = [], refresh: bool = False,  # noqa: B006
               benchmarks: Optional[str] = None, train: TrainSettings = TrainSettings(),
               evaluation: EvalSettings = EvalSettings()) -> dict:
    """Run one step of a run (data stage, train, check, evaluate or report) on the latest outputs of the
    steps before it, as recorded in the run manifest."""
    return pipeline(spec=spec, output_dir=output_dir, overrides=overrides, only=stage,
                    refresh=[stage] if refresh else [], benchmarks=benchmarks, train=train, evaluation=evaluation)


@flow(name="hrm-evaluate", log_prints=True)
def evaluate_flow(checkpoint: str, output_dir: str, benchmarks: Optional[str] = None,
                  contamination: Optional[str] = None, settings: EvalSettings = EvalSettings()) -> dict:
    """Evaluate a checkpoint folder (model.safetensors + config.json, with its tokenizer) with
    lm-evaluation-harness; `contamination`: a contamination folder for clean-subset scores."""
    from evaluation.run import run as run_eval, table

    res = run_eval(checkpoint, None, benchmarks, output_dir, tasks=settings.tasks, limit=settings.limit,
                   contamination_items=contamination, num_fewshot=settings.fewshot or None,
                   batch_size=settings.batch_size, max_gen_toks=settings.max_gen_toks, protocol=settings.protocol)
    create_markdown_artifact(table(res), key=artifact_key("scores", Path(output_dir).resolve().name,
                                                          sha256_json(str(Path(output_dir).resolve()))[:8]),
                             description=f"scores of {checkpoint} ({Path(output_dir).resolve()})")
    return {"results": str(Path(output_dir).resolve() / "results.json"), "tasks": list(res.get("tasks", {}))}


@flow(name="hrm-lineage", log_prints=True)
def lineage_flow(run_dir: str, row_id: str, mode: Literal["why", "trace"] = "why") -> str:
    """Where one training row came from and what happened to it (packed where, or removed why)."""
    from pipeline.trace import trace, trace_markdown, why

    text = why(run_dir, row_id) if mode == "why" else trace_markdown(trace(run_dir, row_id))
    body = text if mode == "trace" else f"# `{row_id}`\n\n" + "\n\n".join(text.splitlines())
    where = Path(run_dir).resolve()  # the key names the run folder: the same row id in two runs gets two artifacts
    create_markdown_artifact(body, key=artifact_key("lineage", mode, where.name, sha256_json(str(where))[:8], row_id),
                             description=f"lineage {mode} of {row_id} in {run_dir}")
    get_run_logger().info("%s", text)
    return text


def zombie_automation():
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="A flow run that stops sending heartbeats (its process died: kill -9, OOM, a lost machine) "
                    "is marked Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_S),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {ZOMBIE_AFTER_S} s: the process running this flow "
                                            "run died")],
    )


def install_zombie_automation() -> str:
    """Create the zombie-run automation unless one of that name exists; returns its id."""
    from prefect.automations import Automation

    try:
        found = Automation.read(name=ZOMBIE_AUTOMATION)
    except (ValueError, LookupError):
        found = None
    except Exception as e:  # noqa: BLE001 - "not found" is raised as different types across versions
        if "not found" not in str(e).lower():
            raise
        found = None
    if found is not None:
        return str(found.id)
    return str(zombie_automation().create().id)


def deployments() -> list:
    return [
        pipeline.to_deployment(name="pipeline", description=pipeline.__doc__),
        ablation.to_deployment(name="ablation", description=ablation.__doc__),
        stage_flow.to_deployment(name="stage", description=stage_flow.__doc__, parameters={"stage": "dedup"}),
        evaluate_flow.to_deployment(name="evaluate", description=evaluate_flow.__doc__),
        lineage_flow.to_deployment(name="lineage", description=lineage_flow.__doc__),
    ]


def serve_all(limit: int | None = None) -> None:
    """Register the deployments and run them on request (blocks). Heartbeats on, zombie automation in."""
    from prefect import serve

    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    install_zombie_automation()
    serve(*deployments(), limit=limit)


def start_server(port: int = 4200, wait: bool = True) -> subprocess.Popen:
    """`prefect server start` bound to 127.0.0.1 (its SQLite database under PREFECT_HOME); then the
    zombie automation is installed. Returns the server process."""
    env = {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env)
    if wait:
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 120
        import httpx

        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode} (port {port} in use?)")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            proc.terminate()
            raise RuntimeError(f"prefect server did not answer on {url} within 120 s")
        os.environ["PREFECT_API_URL"] = url
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):  # Prefect read its settings at import
            install_zombie_automation()
    return proc


__all__ = ["deployments", "serve_all", "start_server", "install_zombie_automation", "stage_flow", "evaluate_flow",
           "lineage_flow", "ZOMBIE_AUTOMATION"]
