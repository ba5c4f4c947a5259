"""The cluster commands, written once: the end-to-end test runs exactly these, and docs/CLUSTER.md's "The commands"
section shows exactly these (tests/infra/test_infra_readme.py checks that), with its placeholders filled in:

  $BUCKET   the object-store bucket          $RAY      the Ray cluster address (``ray start --head`` prints it)
  $MLFLOW   the MLflow tracking server URI   $PORT     the serving port
"""

from __future__ import annotations

import shlex

DATA_BUILD = "varsr data build --input s3://$BUCKET/raw --output s3://$BUCKET/shards --config tiny --ray-address $RAY"
TRAIN_C2I = (
    "varsr train c2i --config configs/train/stage1_c2i_tiny.yaml --ray-address $RAY "
    "--set data.shards=s3://$BUCKET/shards --set output_dir=s3://$BUCKET/runs/stage1 "
    "--set tracking.tracking_uri=$MLFLOW --set ray.num_workers=2"
)
TRAIN_ISR = (
    "varsr train isr --config configs/train/stage2_isr_tiny.yaml --ray-address $RAY "
    "--set data.shards=s3://$BUCKET/shards --set output_dir=s3://$BUCKET/runs/stage2 "
    "--set model.init_from=s3://$BUCKET/runs/stage1/final --set tracking.tracking_uri=$MLFLOW "
    "--set ray.num_workers=2 --set register.name=varsr"
)
SERVE = "varsr serve models:/varsr@champion --port $PORT --tracking-uri $MLFLOW"

README_COMMANDS = (DATA_BUILD, TRAIN_C2I, TRAIN_ISR, SERVE)


def argv(template: str, extra: tuple[str, ...] = (), **values: str) -> list[str]:
    """The command's arguments after ``varsr``, placeholders filled in, plus test-only extras (smaller runs)."""
    text = template
    for k, v in values.items():
        text = text.replace(f"${k}", v)
    assert "$" not in text, text
    return shlex.split(text)[1:] + list(extra)
