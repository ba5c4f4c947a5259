"""Elastic Ray Train on the multi-node Ray cluster (tests/cluster/conftest.py: a 0-CPU head and two 1-CPU worker
nodes on loopback, outputs in moto's S3): ``ray.num_workers=[1,2]`` (docs/ELASTIC.md, "Elastic Ray Train").

The run starts on both nodes; one is killed after the first checkpoint. Ray Train v2's elastic policy restarts the
run on the one node left, which resumes the 2-rank checkpoint on 1 rank (training/reshard.py) and goes on; when a
node is added back, the policy grows the run to 2 workers again, which resume the 1-rank checkpoint on 2 ranks. The
run ends with every step done, a finite loss and its final checkpoint committed (``COMPLETE``).
"""

from __future__ import annotations

import json
import math
import re

import pytest

from infra.core import storage
from tests.cluster import commands
from tests.cluster.conftest import run_varsr, start_varsr, varsr_env, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

# long enough that the run is still training while a lost node is noticed and while a re-added one is taken up
# (each takes Ray's health check, the autoscaling coordinator's 20 s view of the nodes and a restart of the workers)
MAX_STEPS = 400
TRAIN = (
    "--set",
    f"max_steps={MAX_STEPS}",
    "--set",
    "checkpoint_every=10",
    "--set",
    "data.workers=0",
    "--set",
    "validation.num_images=1",
    "--set",
    "validation.batches=1",
    "--set",
    "validation.every=100000",
    "--set",
    "ray.cpus_per_worker=1",
    "--set",
    "model.overrides.num_classes=4",
    "--set",
    "tracking.enabled=false",
    "--set",
    "ray.max_failures=2",
    "--set",
    "optim.warmup_epochs=0",
    "--set",
    "model.overrides.drop_path_rate=0.0",
    "--set",
    "ray.num_workers=[1,2]",
    "--set",
    "ray.resize_check_s=5",
)
# "[train] stage c2i preset c2i-tiny: … world 2, ZeRO-0 fp32, steps 0->400 of 400": one line per attempt
ATTEMPT = re.compile(r"\[train\] stage .*? world (\d+), ZeRO-\d \w+, steps (\d+)->(\d+) of (\d+)")


def _attempts(text: str) -> list[tuple[int, int]]:
    """(world size, first step) of every start of the training loop, in order."""
    return [(int(m.group(1)), int(m.group(2))) for m in ATTEMPT.finditer(text)]


def test_a_run_shrinks_when_a_node_is_lost_and_grows_when_it_comes_back(ray_cluster, s3_server, tmp_path):
    from data_pipeline.sample_corpus import write_sample_corpus

    bucket = s3_server.create_bucket()
    write_sample_corpus(tmp_path / "corpus", with_bad_files=False)
    for p in sorted((tmp_path / "corpus").rglob("*")):
        if p.is_file():
            storage.write_bytes(f"s3://{bucket}/raw/{p.relative_to(tmp_path / 'corpus')}", p.read_bytes())
    # a worker group that cannot be placed (the coordinator still counts the lost node) gives up sooner than Ray's 60 s
    env = varsr_env(s3_server, extra={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"})
    values = dict(BUCKET=bucket, RAY=ray_cluster.address, MLFLOW="unused")
    run_varsr(
        commands.argv(
            commands.DATA_BUILD,
            (
                "--set",
                "shard.max_samples_per_shard=4",
                "--set",
                "select.cluster.k=4",
                "--set",
                "score.weights_dir=/none",
            ),
            **values,
        ),
        env,
        tmp_path,
        tmp_path / "data.log",
    )
    args = commands.argv(commands.TRAIN_C2I, TRAIN, **values)
    args[args.index(f"output_dir=s3://{bucket}/runs/stage1")] = f"output_dir=s3://{bucket}/runs/elastic"
    assert args.index("ray.num_workers=2") < args.index("ray.num_workers=[1,2]")  # the later --set wins

    log = tmp_path / "elastic.log"
    proc = start_varsr(args, env, tmp_path, log)
    try:

        def reported() -> bool:
            return any(
                k.endswith("varsr_checkpoint.json") for k in s3_server.list_keys(bucket, "runs/elastic/ray_results/")
            )

        wait_for(reported, 900, "the first checkpoint reported to Ray Train", proc, log)
        victim = next(n for n, d in ray_cluster.scratch_of.items() if any(d.glob("varsr-run-*-rank1")))
        ray_cluster.kill_worker(victim)  # no replacement yet: the run must go on with one worker
        wait_for(
            lambda: any(w == 1 for w, _ in _attempts(log.read_text())),
            600,
            "the run restarted on the one node left",
            proc,
            log,
        )
        ray_cluster.add_worker()  # the node comes back (as a spot node would)
        assert proc.wait(timeout=1200) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    attempts = _attempts(text)
    worlds = [w for w, _ in attempts]
    assert worlds[0] == 2 and 1 in worlds, attempts
    shrunk = worlds.index(1)
    assert attempts[shrunk][1] > 0, f"the 1-worker run did not resume from a checkpoint: {attempts}"
    assert re.search(r"written by 2 rank\(s\); resumed on 1 at step", text), "no 2 -> 1 resume in the log"
    grown = [i for i in range(shrunk + 1, len(attempts)) if worlds[i] == 2]
    assert grown, f"the run did not grow back to 2 workers after the node came back: {attempts}"
    assert attempts[grown[0]][1] >= attempts[shrunk][1], attempts
    assert re.search(r"written by 1 rank\(s\); resumed on 2 at step", text), "no 1 -> 2 resume in the log"

    run = f"s3://{bucket}/runs/elastic"
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert summary["status"] == "FINISHED" and summary["steps"] == MAX_STEPS, summary
    final = f"{run}/checkpoints/step_{MAX_STEPS:08d}"
    assert storage.exists(f"{final}/COMPLETE"), "the final checkpoint was not committed"
    state = json.loads(storage.read_text(f"{final}/trainer_state.json"))
    assert state["step"] == MAX_STEPS and state["world_size"] == 2, state
    hist = [json.loads(x) for x in storage.read_text(f"{run}/history.jsonl").splitlines()]
    losses = {h["step"]: h["loss/total"] for h in hist if "loss/total" in h}
    assert MAX_STEPS in losses and all(math.isfinite(v) for v in losses.values()), "a loss is missing or not finite"
