"""stage=pipeline: every stage in its own run directory, in dependency order, finished ones skipped, then the report.

Each stage runs as its own `python -m alignlab stage=<s>` process with this command line's overrides (minus the
pipeline's own stage.* keys) plus stage.overrides.<s>, so a stage run by the pipeline is exactly the run a user
would start by hand, and launcher=deepspeed, logger=wandb, experiment=... pass through. Stages whose inputs are
ready run at the same time (stage.jobs). On CPU the cores are shared out among the stages that can run now: a
stage alone (pretraining) gets them all, two stages side by side one each. On TinyHH's model that does 1.3x (PPO)
to 2.2x (SFT) the work of running them one after the other on two threads: small matmuls scale poorly across
threads.

A stage is skipped when its run directory holds the done.json marker (alignlab/recipes/__init__.py) with the
same config as the one composed now and no input stage runs again or finished after it: make's rule, with the
resolved config standing in for the file's contents.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from alignlab.checkpoint import PREEMPTED_EXIT, atomic_write_json
from alignlab.launch import exit_code_for_signal, forward_signals
from alignlab.lifecycle import start_run, tinyhh_dir
from alignlab.runs import config_changes, read_done
from alignlab.stages import PIPELINE_STAGES, STAGES

log = logging.getLogger("alignlab.pipeline")

BAR = re.compile(r"([^\r\n:|]*):\s+\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+) \[")
LIBRARY_BARS = ("Loading", "Writing", "Saving", "Map", "Filter", "Generating", "Creating", "Tokenizing")
RANK_VARIABLES = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
}


@dataclass
class Step:
    stage: str
    args: list[str]  # the stage's command line after `python -m alignlab`
    config: dict  # its resolved config, composed before anything runs
    run_dir: Path
    deps: list[str]
    reason: str | None = None  # why it runs; None: finished already, skipped
    state: str = "pending"  # pending | running | done | skipped | failed | cancelled
    wall_s: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0
    log_path: Path | None = None
    log_file: object = field(default=None, repr=False)


def common_overrides(task_overrides: list[str]) -> list[str]:
    """The pipeline's command line minus what belongs to the pipeline itself (stage=, stage.*, run_dir=)."""
    keep = []
    for o in task_overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key in ("stage", "run_dir") or key.startswith("stage."):
            continue
        keep.append(o)
    return keep


def pipeline_stages(p: DictConfig) -> list[str]:
    """The stages to run (stage.stages), once its stage.stages, stage.rerun and stage.overrides are checked."""
    stages = list(p.stages)
    unknown = [s for s in [*stages, *p.rerun, *p.overrides] if s not in PIPELINE_STAGES]
    if unknown:
        raise ValueError(
            f"stage.stages / stage.rerun / stage.overrides name unknown stages {unknown}; the pipeline's stages "
            f"are {list(PIPELINE_STAGES)}"
        )
    if len(set(stages)) != len(stages) or not stages:
        raise ValueError(f"stage.stages={stages} must list each stage once (and at least one)")
    bad_rerun = [s for s in p.rerun if s not in stages]
    if bad_rerun:
        raise ValueError(
            f"stage.rerun={list(p.rerun)} names stages that are not in stage.stages: {bad_rerun}"
        )
    for s, extra in p.overrides.items():
        for o in extra:
            key = o.lstrip("+~").split("=", 1)[0]
            if key in ("stage", "run_dir"):
                raise ValueError(f"stage.overrides.{s} may not set {key}= ({o!r}); the pipeline sets it")
    return stages


def decide(steps: dict[str, Step], rerun: set[str]) -> None:
    """Set each step's reason to run (None: skip), in dependency order: make's rule on resolved configs."""
    for s, step in steps.items():  # steps are in topological order
        done = read_done(step.run_dir)
        runs_again = [d for d in step.deps if steps[d].reason is not None]
        if s in rerun:
            step.reason = "asked (stage.rerun)"
        elif done is None:
            step.reason = "unfinished (no done.json)" if step.run_dir.exists() else "not run yet"
            if continues(step, steps, runs_again):
                step.args.append("resume=auto")
                step.reason += "; continues from its newest checkpoint (resume=auto)"
        elif changes := config_changes(s, done["config"], step.config):
            step.reason = "config changed: " + "; ".join(changes)
        elif runs_again:
            step.reason = f"its input {runs_again[0]} runs again"
        elif newer := [
            d for d in step.deps if (read_done(steps[d].run_dir) or {}).get("finished", 0) > done["finished"]
        ]:
            step.reason = f"its input {newer[0]} finished after it"
        else:
            step.reason = None
            step.state = "skipped"
            step.wall_s = done.get("wall_s", 0.0)


def continues(step: Step, steps: dict[str, Step], runs_again: list[str]) -> bool:
    """An interrupted stage resumes (resume=auto) when its inputs are the ones it started from.

    That is: none of them runs again and each finished before the stage started (its config.yaml). The stage
    itself still checks its checkpoint against its config; a user's own resume= override is left alone.
    """
    started = step.run_dir / "config.yaml"
    if runs_again or not started.exists() or any(a.startswith("resume=") for a in step.args):
        return False
    finished = [(read_done(steps[d].run_dir) or {}).get("finished", float("inf")) for d in step.deps]
    return all(f < started.stat().st_mtime for f in finished)


def topological(stages: list[str]) -> list[str]:
    """The chosen stages in the registry's order, which lists every stage after its inputs."""
    return [s for s in PIPELINE_STAGES if s in stages]


def priority(stage: str, stages: list[str]) -> float:
    """Minutes from this stage's start to the end of the longest chain through it (longest first)."""
    after = [t for t in stages if stage in STAGES[t].inputs]
    return STAGES[stage].cost + max((priority(t, stages) for t in after), default=0)


def run_order(steps: dict[str, Step], stages: list[str]) -> list[str]:
    """The stages that run (a reason set by decide), the one heading the longest chain first."""
    return sorted((s for s in steps if steps[s].reason), key=lambda s: -priority(s, stages))


def auto_jobs(cores: int) -> int:
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(4, cores))


def progress_of(log_path: Path | None) -> str:
    """The last 'n/total' a stage's progress bar wrote to its log (tqdm redraws with carriage returns)."""
    if log_path is None or not log_path.exists():
        return ""
    with open(log_path, "rb") as f:
        f.seek(max(0, log_path.stat().st_size - 4096))
        tail = f.read().decode("utf-8", "replace")
    # "<desc>:  45%|####      | 45/100 [..."; the libraries' own bars (loading weights, writing shards, datasets'
    # map) are not the stage's progress
    found = [m for m in BAR.findall(tail) if not m[0].strip().startswith(LIBRARY_BARS)]
    return f" {found[-1][1]}/{found[-1][2]}" if found else ""


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def compose_steps(stages: list[str], common: list[str], overrides: DictConfig) -> dict[str, Step]:
    """Every chosen stage's command line and resolved config, in dependency order, before anything runs."""
    steps: dict[str, Step] = {}
    for s in topological(stages):
        args = [f"stage={s}", *common, *overrides.get(s, [])]
        try:
            composed = compose(config_name="config", overrides=args)
            config = OmegaConf.to_container(composed, resolve=True)
        except Exception as e:  # Hydra's own message names the override; add which stage it came from
            raise ValueError(f"stage {s} of the pipeline does not compose with {args}: {e}") from e
        steps[s] = Step(
            s, args, config, Path(config["run_dir"]), [d for d in STAGES[s].inputs if d in stages]
        )
    return steps


def save_status(path: Path, steps: dict[str, Step]) -> None:
    """pipeline.json: every stage's state, why it ran, its time, run directory, log and command line."""
    atomic_write_json(
        path,
        {
            s: {"state": st.state, "reason": st.reason, "wall_s": round(st.wall_s, 1), "run_dir": str(st.run_dir),
                "log": str(st.log_path) if st.log_path else None, "command": ["python", "-m", "alignlab", *st.args]}
            for s, st in steps.items()
        },
    )  # fmt: skip


@dataclass
class Scheduler:
    """Starts the stages whose inputs are ready (longest chain first), up to `jobs` at once, each as its own process
    group with its log; collects the finished ones. After a failure nothing new starts; the running ones finish."""

    steps: dict[str, Step]
    order: list[str]  # the stages to run, longest chain first
    jobs: int
    threads: int  # CPU threads per stage (0: the cores shared among the stages that can run when it starts)
    cores: int
    log_dir: Path
    status: Path  # pipeline.json, rewritten after every change
    failed: list[str] = field(default_factory=list)
    # The pipeline's own (one-process) rank layout must not leak: each stage sets up its own, on a free port.
    env: dict[str, str] = field(
        default_factory=lambda: {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    )

    def running(self) -> list[Step]:
        return [st for st in self.steps.values() if st.state == "running"]

    def advance(self) -> list[Step]:
        """Collect the stages that exited (returned), then start those now ready."""
        finished = [st for st in self.running() if st.proc.poll() is not None]
        for st in finished:
            self.finish(st, st.proc.poll())
        running, waiting = self.running(), [s for s in self.order if self.steps[s].state == "pending"]
        if self.failed:
            for s in waiting:
                self.steps[s].state = "cancelled"
            return finished
        ready = [s for s in waiting if self.inputs_ready(self.steps[s])]
        for i, s in enumerate(ready):
            if len(running) >= self.jobs:
                break
            self.start(self.steps[s], sharing=len(running) + len(ready) - i)
            running.append(self.steps[s])
        return finished

    def inputs_ready(self, st: Step) -> bool:
        return all(self.steps[d].state in ("done", "skipped") for d in st.deps)

    def finish(self, st: Step, code: int) -> None:
        st.wall_s = time.time() - st.started
        st.log_file.close()
        if code == 0 and read_done(st.run_dir) is not None:
            st.state = "done"
            log.info("%s finished in %s", st.stage, minutes(st.wall_s))
        else:
            st.state = "failed"
            self.failed.append(st.stage)
            log.error(
                "%s failed (exit code %d) after %s; its log: %s",
                st.stage,
                code,
                minutes(st.wall_s),
                st.log_path,
            )
        save_status(self.status, self.steps)

    def start(self, st: Step, sharing: int) -> None:
        """Start st with the cores shared among `sharing` stages (a thread count the user exported wins over ours)."""
        threads = self.threads or max(1, self.cores // max(1, min(self.jobs, sharing)))
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **self.env}
        st.log_path = self.log_dir / f"{st.stage}.log"
        st.log_file = open(st.log_path, "w")
        log.info(
            "starting %s (%s threads): python -m alignlab %s",
            st.stage,
            env["OMP_NUM_THREADS"],
            " ".join(st.args),
        )
        st.proc = subprocess.Popen(
            [sys.executable, "-m", "alignlab", *st.args], stdout=st.log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        st.state, st.started = "running", time.time()
        save_status(self.status, self.steps)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Signal every running stage's process group (a DeepSpeed stage is several processes); wait for them."""
        alive = [st for st in self.running() if st.proc.poll() is None]
        for st in alive:
            os.killpg(st.proc.pid, signum)
            st.state = "cancelled"
        for st in alive:
            try:
                st.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(st.proc.pid, signal.SIGKILL)

    def on_signal(self, signum: int) -> None:
        """The pipeline's policy for a forwarded signal: every stage gets it, then the pipeline stops."""
        self.stop(signum)
        # a scheduler's signal: the stages checkpointed (exit 75), so the requeued pipeline continues them
        raise SystemExit(PREEMPTED_EXIT if signum != signal.SIGINT else exit_code_for_signal(signum))

    def progress(self, now: float, start: float) -> str:
        """'ppo_ptx 45/100 4m10s, rain 312/600 4m55s | total 9m02s': each running stage's own progress bar."""
        stages = [
            f"{st.stage}{progress_of(st.log_path)} {minutes(now - st.started)}" for st in self.running()
        ]
        return ", ".join(stages) + f" | total {minutes(now - start)}"


def summarise(steps: dict[str, Step], failed: list[str], total: float) -> None:
    """Every stage's status and time; the failing stage's log tail as the error, else the evaluation report's table."""
    lines = [f"pipeline finished in {minutes(total)}" + (f"; FAILED: {', '.join(failed)}" if failed else "")]
    for s, st in steps.items():
        lines.append(f"  {s:<22} {st.state:<9} {minutes(st.wall_s) if st.wall_s else '':>7}  {st.run_dir}")
    log.info("\n".join(lines))
    if failed:
        tail = steps[failed[0]].log_path.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(
            f"stage {failed[0]} failed; the last lines of {steps[failed[0]].log_path}:\n" + "\n".join(tail)
        )
    if "eval" in steps and (steps["eval"].run_dir / "report.md").exists():
        report = steps["eval"].run_dir / "report.md"
        table = report.read_text().split("## ")[0]
        log.info("%s\nfull report with plots: %s", table.strip(), report)


def run(cfg: DictConfig) -> None:
    run = start_run(cfg)
    p = cfg.stage
    stages = pipeline_stages(p)
    cores = os.cpu_count() or 1
    jobs = p.jobs or auto_jobs(cores)

    # 1. Compose every stage's config before anything runs: a typo in an override fails now, not 15 minutes in.
    steps = compose_steps(stages, common_overrides(list(HydraConfig.get().overrides.task)), p.overrides)

    # 2. Which stages run, and why.
    decide(steps, set(p.rerun))
    order = run_order(steps, stages)
    log.info(
        "pipeline: %d stages, %d to run, up to %d at once on %d cores; logs in %s/logs",
        len(steps), len(order), jobs, cores, run.run_dir,
    )  # fmt: skip
    for s, step in steps.items():
        log.info("  %-22s %s", s, f"runs: {step.reason}" if step.reason else f"finished ({step.run_dir})")

    # 3. TinyHH's data once, before stages that read it start together.
    if any(step.config["data"]["name"] == "tinyhh" for step in steps.values() if step.reason):
        tinyhh_dir(cfg)

    # 4. Start every stage whose inputs are ready (longest chain first), up to `jobs` at once; poll.
    (run.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    status = run.run_dir / "pipeline.json"
    scheduler = Scheduler(steps, order, jobs, p.threads, cores, log_dir=run.run_dir / "logs", status=status)
    bar = run.tracker.progress(total=len(order), desc="pipeline")
    start, finished, interactive, last_line = time.time(), 0, sys.stderr.isatty(), 0.0
    with forward_signals(scheduler.on_signal), contextlib.closing(bar):
        try:
            while True:
                for st in scheduler.advance():
                    finished += 1
                    bar.update(1)
                    run.tracker.log(
                        {
                            f"pipeline/{st.stage}_wall_s": st.wall_s,
                            f"pipeline/{st.stage}_ok": int(st.state == "done"),
                        },
                        step=finished,
                    )
                if not scheduler.running():
                    break
                # on a terminal the bar redraws every refresh_s; into a file (CI, sbatch) one line every 30 s
                now = time.time()
                redraw = interactive or now - last_line >= 30
                last_line = now if redraw else last_line
                bar.set_postfix_str(scheduler.progress(now, start), refresh=redraw)
                time.sleep(p.refresh_s)
        finally:
            scheduler.stop()
            save_status(status, steps)

    # 5. Summary: every stage's status and time, then the evaluation report's table.
    total = time.time() - start
    run.tracker.log({"pipeline/wall_s": total, "pipeline/failed": len(scheduler.failed)}, step=len(order))
    run.tracker.close()
    summarise(steps, scheduler.failed, total)
