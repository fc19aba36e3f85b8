#!/usr/bin/env python3
"""Print the Deployment and KEDA ScaledObject of one more model's workers, made from this
folder's worker.yaml and scaledobject.yaml, for `kubectl apply`:

    python ops/k8s/model.py sdxl stabilityai/stable-diffusion-xl-base-1.0 --warm-shapes 1024x1024:4 > model-sdxl.yaml
    kubectl -n deepqueue apply -f model-sdxl.yaml

The workers declare the alias (DEEPQUEUE_MODEL_ALIAS), so they serve the queue of the runs
submitted with `--model ALIAS` and only those; KEDA scales them on that queue's backlog (its
waiting list and the reserved jobs the workers export with its name), from zero. Everything
else is the base worker's: the ConfigMap (but DEEPQUEUE_WARM_SHAPES: this model's own, none unless
given), the Secret, probes, the model cache volume. Their pods
carry `app.kubernetes.io/component: worker-ALIAS`, so the two Deployments never select each
other's pods (a PodMonitor selecting `app.kubernetes.io/name: deepqueue` finds them all).

Needs PyYAML (`pip install pyyaml`).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
BASE = "deepqueue-worker"
#: What DEEPQUEUE_MODEL_ALIAS accepts (producer.job.ModelAlias), so that names stay valid here too.
ALIAS = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def _one(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc["kind"] == kind]
    return doc


def manifests(alias: str, model: str, queue: str = "deepqueue", warm_shapes: str = "") -> list[dict[str, Any]]:
    """The base worker's Deployment and ScaledObject, renamed and pointed at ``alias``'s queue."""
    if not ALIAS.match(alias):
        raise ValueError(f"alias {alias!r}: lowercase letters, digits and '-', at most 32, as DEEPQUEUE_MODEL_ALIAS")
    name, component, model_queue = f"{BASE}-{alias}", f"worker-{alias}", f"{queue}.{alias}"
    deployment = copy.deepcopy(_one(HERE / "worker.yaml", "Deployment"))
    deployment["metadata"]["name"] = name
    for labels in (
        deployment["metadata"]["labels"],
        deployment["spec"]["selector"]["matchLabels"],
        deployment["spec"]["template"]["metadata"]["labels"],
    ):
        labels["app.kubernetes.io/component"] = component
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container["env"] = [
        {"name": "DEEPQUEUE_MODEL", "value": model},
        {"name": "DEEPQUEUE_MODEL_ALIAS", "value": alias},
        {"name": "DEEPQUEUE_WARM_SHAPES", "value": warm_shapes},
        *container["env"],
    ]
    scaled = copy.deepcopy(_one(HERE / "scaledobject.yaml", "ScaledObject"))
    scaled["metadata"]["name"] = name
    scaled["metadata"]["labels"]["app.kubernetes.io/component"] = component
    scaled["spec"]["scaleTargetRef"]["name"] = name
    for trigger in scaled["spec"]["triggers"]:
        metadata = trigger["metadata"]
        if "listName" in metadata:
            metadata["listName"] = model_queue
        if "query" in metadata:
            metadata["query"] = metadata["query"].replace(f'queue="{queue}"', f'queue="{model_queue}"')
    return [deployment, scaled]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("alias", help="the model's alias: runs name it with `deepqueue submit --model ALIAS`")
    parser.add_argument("model", help="its diffusers model id on the Hub, or a folder under /models")
    parser.add_argument("--queue", default="deepqueue", help="DEEPQUEUE_QUEUE of the ConfigMap (default deepqueue)")
    parser.add_argument(
        "--warm-shapes", default="", help="WxH:N,... compiled before ready, e.g. 1024x1024:4 (default: none)"
    )
    args = parser.parse_args(argv)
    try:
        docs = manifests(args.alias, args.model, args.queue, args.warm_shapes)
    except ValueError as error:
        parser.error(str(error))
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
