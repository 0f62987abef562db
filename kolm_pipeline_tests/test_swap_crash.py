"""Crash test of the pointer swap: 200 processes publishing and swapping artifacts in a loop are each
killed with SIGKILL after a random delay; after every kill the pointer names a complete artifact that
verifies, and no file under a final ``<cid>.kolm`` name is partial."""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from kolm_pipeline.provenance.atomic import remove_stale_temps
from kolm_pipeline.provenance.keys import keyid_for, load_private_key
from kolm_pipeline.registry import cid_for_file, load_public_keys, read_pointer, swap_pointer, verify_kolm
from kolm_pipeline.registry.deployment import make_deployment_receipt, write_deployment_receipt
from kolm_pipeline.registry.swap import publish_artifact
from kolm_pipeline_tests.test_registry_support import fake_adapter, signed_artifact

TASK = "acme.crash"
KILLS = 200


def swap_forever(adapters_dir: str, artifacts_dir: str, keys_dir: str, sources: list[str], seed: int,
                 started) -> None:
    """What a deployment does to the filesystem, over and over: publish, deployment receipt, swap."""
    from kolm_pipeline.registry import read_kolm

    rng = random.Random(seed)
    key = load_private_key(Path(keys_dir), "acme")
    signer = (key, keyid_for(key.public_key()))
    started.set()
    while True:
        source = Path(rng.choice(sources))
        local = publish_artifact(Path(artifacts_dir), TASK, source)
        receipt = make_deployment_receipt(read_kolm(local), local.stem, decision="swap", from_cid=None,
                                          k_before=None, k_after=None, actor="crash-test", signer=signer)
        write_deployment_receipt(local, receipt)
        swap_pointer(Path(adapters_dir), TASK, local)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Twenty distinct artifacts of ~256 KiB each, so a publish takes long enough to be interrupted."""
    root = tmp_path_factory.mktemp("crash")
    keys_dir = root / "keys"
    built = []
    for index in range(20):
        adapter = fake_adapter(root / f"adapter-{index}", seed=index)
        weights = np.random.default_rng(index).standard_normal((256, 256), np.float32)
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": weights},
                  str(adapter / "adapter_model.safetensors"))
        built.append(signed_artifact(root / "incoming" / f"{index}.kolm", adapter_dir=adapter, keys_dir=keys_dir,
                                     task=TASK, salt=str(index)))
    return keys_dir, built


def test_pointer_survives_sigkill_at_random_points(tmp_path, sources):
    keys_dir, artifacts = sources
    keys = load_public_keys(keys_dir)
    adapters_dir, artifacts_dir = tmp_path / "adapters", tmp_path / "artifacts"
    swap_pointer(adapters_dir, TASK, publish_artifact(artifacts_dir, TASK, artifacts[0]))
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    rng = random.Random(7)
    changed = 0
    began = time.monotonic()
    for run in range(KILLS):
        before = read_pointer(adapters_dir, TASK)
        # Keep only the serving artifact, so the next process has real copying to do before it swaps.
        for path in (artifacts_dir / TASK).glob("*.kolm"):
            if path != before:
                path.unlink()
        started = context.Event()
        worker = context.Process(target=swap_forever, args=(str(adapters_dir), str(artifacts_dir), str(keys_dir),
                                                            [str(p) for p in artifacts], run, started), daemon=True)
        worker.start()
        assert started.wait(timeout=30), f"run {run}: the worker did not start"
        time.sleep(rng.uniform(0.0, 0.02))  # anywhere in its first few publish + swap cycles
        worker.kill()
        worker.join()
        assert worker.exitcode == -9, f"run {run}: the worker died on its own (exit code {worker.exitcode})"

        target = read_pointer(adapters_dir, TASK)
        assert target is not None and target.is_file()
        report = verify_kolm(target, keys)
        assert report.ok, f"run {run}: pointer names {target.name}, which does not verify: {report.problems}"
        assert report.cid == target.stem
        for path in (artifacts_dir / TASK).glob("*.kolm"):  # final names are only ever complete files
            assert cid_for_file(path) == path.stem, f"run {run}: {path.name} is partial"
        changed += target != before
    # The kills landed both before and after swaps completed (and some in the middle of a copy).
    assert 0 < changed < KILLS, changed
    leftovers = [p for d in (adapters_dir, artifacts_dir / TASK) for p in d.iterdir() if p.name.startswith(".")]
    assert all(p.name.endswith(".tmp") for p in leftovers)  # interrupted writes only ever leave dot-temp files
    print(f"{KILLS} kills in {time.monotonic() - began:.1f} s: pointer moved in {changed} runs; "
          f"{len(leftovers)} temp files left by interrupted writes")

    # The next deployment sweeps temp files once they are old enough not to belong to a live writer.
    assert remove_stale_temps(artifacts_dir / TASK) == 0
    for path in leftovers:
        os.utime(path, (time.time() - 7200,) * 2, follow_symlinks=False)
    assert remove_stale_temps(adapters_dir) + remove_stale_temps(artifacts_dir / TASK) == len(leftovers)
    assert verify_kolm(read_pointer(adapters_dir, TASK), keys).ok
