"""slurm/multi_node.sbatch on two real nodes: a slurmd each in its own network namespace (tests/slurm/netns.py), so
the two ranks of a ZeRO-2 stage rendezvous and all-reduce over a network link, as on a cluster. Its losses equal
those of the same stage on 2 ranks of one node; a USR1 checkpoints, requeues and resumes it on the two nodes."""

from __future__ import annotations

import pytest

from alignlab.tracking import read_metrics
from tests.conftest import ROOT
from tests.slurm.test_sbatch import TINY, resumed_at, wait_for_step

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", *CPU]
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", *CPU]
# TINY (batch 8 = 4 per rank x 2 ranks either way) under ZeRO-2, a loss row every 5 steps, no oracle evaluation;
# warmup past step 40: a step's learning rate does not depend on stage.steps, so the first 20 steps of a 40-step
# run are those of the 20-step run
ZERO2 = [*TINY, "deepspeed=zero2", "stage.log_every=5", "stage.sample_eval=0", "stage.warmup_steps=50"]


@pytest.fixture(scope="module")
def submit(slurm_two_nodes, tmp_path_factory, quick_data):
    """sbatch slurm/multi_node.sbatch with the given sbatch options and overrides; returns (job id, log, run)."""

    def go(options: list[str], *overrides: str):
        tmp = tmp_path_factory.mktemp("job")
        log = tmp / "job.out"
        job_id = slurm_two_nodes.sbatch(
            f"--output={log}",
            *options,
            str(ROOT / "slurm" / "multi_node.sbatch"),
            *overrides,
            f"paths.runs={tmp / 'runs'}",
            f"paths.data={quick_data}",
            cwd=ROOT,
        )
        return job_id, log, tmp / "runs" / "quick" / "pretrain"

    return go


@pytest.fixture(scope="module")
def zero2_runs(slurm_two_nodes, submit):
    """The same ZeRO-2 stage on 2 nodes x 1 rank and on 1 node x 2 ranks (submitted together; the template's
    --exclusive makes them run one after the other)."""
    jobs = {"two_nodes": submit(TWO_NODES, *ZERO2), "one_node": submit(ONE_NODE, *ZERO2)}
    for job_id, log, _ in jobs.values():
        job = slurm_two_nodes.wait(job_id, timeout=300, log=log)
        assert job.state == "COMPLETED" and job.info["ExitCode"] == "0:0", log.read_text()[-4000:]
    return jobs


def losses(run) -> dict[str, list[tuple[int, float]]]:
    rows = read_metrics(run)
    return {k: [(r["step"], r[k]) for r in rows if k in r] for k in ("train/loss", "eval/loss")}


def test_two_nodes_run_one_rank_each_over_the_network(slurm_two_nodes, zero2_runs):
    job_id, log, run = zero2_runs["two_nodes"]
    job = slurm_two_nodes.job(job_id)
    assert job.info["NodeList"] == "node[1-2]" and job.info["NumNodes"] == "2", job.info
    # the task prolog's record: rank 0 on node1, rank 1 on node2, each seeing its own node's hostname
    ranks = {(t["rank"], t["node"], t["hostname"]) for t in slurm_two_nodes.tasks(job_id) if t["step"] == "0"}
    assert ranks == {("0", "node1", "node1"), ("1", "node2", "node2")}, slurm_two_nodes.tasks(job_id)
    out = log.read_text()
    assert "restart 0 on node[1-2]: 2 tasks, MASTER_ADDR=node1" in out, out[-4000:]
    assert "world_size=2" in out and "4 micro x 1 accum x 2 ranks" in out, out[-4000:]
    assert "zero_stage: 2" in (run / "config.yaml").read_text()
    assert (run / "done.json").exists() and (run / "model" / "config.json").exists()


def test_two_nodes_match_one_node_loss_for_loss(zero2_runs):
    """Same ranks, same data shards, same seed: only the transport differs (a veth link instead of loopback),
    and a sum of two gradients is the same in either order, so every logged loss is equal bit for bit."""
    two, one = (losses(zero2_runs[k][2]) for k in ("two_nodes", "one_node"))
    assert [s for s, _ in two["train/loss"]] == [5, 10, 15, 20], two
    assert [s for s, _ in two["eval/loss"]] == [10, 20], two
    assert two == one


def test_usr1_on_two_nodes_checkpoints_requeues_and_resumes(slurm_two_nodes, submit, zero2_runs):
    steps = 40
    job_id, log, run = submit(
        TWO_NODES, *ZERO2, f"stage.steps={steps}", "stage.eval_every=0", "stage.checkpoint_every=20"
    )
    wait_for_step(slurm_two_nodes, job_id, run, log, 5)
    # SIGUSR1 to both ranks, one on each node: they agree on the step, each saves its ZeRO-2 shard
    slurm_two_nodes.run("scancel", "--signal=USR1", job_id)

    job = slurm_two_nodes.wait(job_id, timeout=300, log=log)
    out = log.read_text()
    assert job.state == "COMPLETED" and job.restarts == 1, (job.info, out[-6000:])
    assert out.count("on node[1-2]: 2 tasks") == 2 and "requeueing job" in out, out[-6000:]
    assert 5 <= resumed_at(out) < steps, out[-6000:]
    # both runs' two ranks, one on each node
    ranks = sorted((t["rank"], t["node"]) for t in slurm_two_nodes.tasks(job_id) if t["step"] == "0")
    assert ranks == [("0", "node1"), ("0", "node1"), ("1", "node2"), ("1", "node2")], ranks
    assert (run / "done.json").exists()
    logged = losses(run)["train/loss"]
    assert [s for s, _ in logged] == list(range(5, steps + 1, 5)), logged
    # the resumed run continued the same trajectory: its steps up to 20 are the uninterrupted run's, bit for bit
    assert logged[:4] == losses(zero2_runs["two_nodes"][2])["train/loss"]
