"""Issue 24: work products are written once to the object store under their CID and read back by CID, checked on
the way; a stage on a host that holds none of the files (an empty KOLM_HOME) gets them from there."""

from __future__ import annotations

import json
import shutil

import pytest

from kolm_pipeline.provenance.cid import cid_for_bytes, cid_for_file
from kolm_pipeline.provenance.errors import RegistryError
from kolm_pipeline.provenance.objectstore import DirectoryStore
from kolm_pipeline.provenance.products import Products, directory_cid, product_key
from kolm_pipeline.settings import load_settings
from kolm_pipeline.stages.corpus import run_corpus_stage, run_recipe_stage
from kolm_pipeline.stages.workdir import NamespaceWorkdir, ProductMissing
from kolm_pipeline.store import CaptureStore
from kolm_pipeline_tests.conftest import AUTO_REPLY, capture_tickets

PARTITION = "acme.support"


def _tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(b"\x00beta")
    return root


def test_directories_round_trip_by_cid_and_tampering_is_refused(tmp_path):
    products = Products(DirectoryStore(tmp_path / "objects"))
    source = _tree(tmp_path / "source")
    cid = products.put_dir(source)
    assert cid == directory_cid(source)
    assert products.put_dir(source) == cid  # idempotent: same bytes, same keys, nothing rewritten

    fetched = products.fetch_dir(cid, tmp_path / "elsewhere" / "copy")
    assert directory_cid(fetched) == cid and (fetched / "sub" / "b.bin").read_bytes() == b"\x00beta"
    # Fetching again over an existing copy swaps it whole.
    (fetched / "a.txt").write_text("edited")
    assert directory_cid(products.fetch_dir(cid, fetched)) == cid

    # A changed object does not hash to its key's CID: refused, the destination left as it was.
    victim = tmp_path / "objects" / product_key(cid_for_file(source / "a.txt"), cid)
    victim.write_text("forged")
    with pytest.raises(RegistryError, match="does not hash to"):
        products.fetch_dir(cid, fetched)
    assert (fetched / "a.txt").read_text() == "alpha"

    # An index naming a path outside its directory is refused before anything is written.
    evil = json.dumps({"../escaped": cid_for_file(source / "sub" / "b.bin")}, sort_keys=True).encode()
    (tmp_path / "objects" / product_key(cid_for_bytes(evil))).write_bytes(evil)
    with pytest.raises(RegistryError, match="outside its directory"):
        products.fetch_dir(cid_for_bytes(evil), tmp_path / "evil" / "dir")
    assert not (tmp_path / "evil" / "escaped").exists()

    # Retention removes a directory's files and its index.
    products.delete(cid, directory=True, scratch=tmp_path)
    assert not products.objects.exists(product_key(cid))
    assert not products.objects.exists(product_key(cid_for_file(source / "sub" / "b.bin"), cid))


def test_removing_a_directory_keeps_the_same_bytes_of_another_product(tmp_path):
    """A recipe's holdout.jsonl has the frozen hold-out's bytes: removing the recipe must not remove the hold-out."""
    products = Products(DirectoryStore(tmp_path / "objects"))
    recipe = _tree(tmp_path / "recipe")
    (recipe / "holdout.jsonl").write_text('{"messages": []}\n')
    holdout = tmp_path / "holdout.frozen.jsonl"
    holdout.write_text('{"messages": []}\n')
    recipe_cid, holdout_cid = products.put_dir(recipe), products.put_file(holdout)
    products.delete(recipe_cid, directory=True, scratch=tmp_path)
    assert products.fetch_file(holdout_cid, tmp_path / "again.jsonl").read_text() == '{"messages": []}\n'
    with pytest.raises(RegistryError):
        products.fetch_dir(recipe_cid, tmp_path / "gone")


def test_a_stage_on_an_empty_home_pulls_its_chain_by_cid(tmp_path, tiny_tickets):
    """The corpus stage runs on one host; the recipe stage on another (its own KOLM_HOME, the same store and object
    store) reads that corpus by CID, with its receipt; a product retention removed is a clear error, not a crash."""
    objects = f"file://{tmp_path / 'bucket'}"
    one = load_settings(tmp_path / "host-one").model_copy(update={"artifacts_url": objects})
    two = load_settings(tmp_path / "host-two").model_copy(
        update={"artifacts_url": objects, "keys_path": one.keys_dir})
    store = CaptureStore(f"sqlite:///{tmp_path / 'shared.db'}")
    store.create_tenant("acme")
    capture_tickets(store, "acme", "support", tiny_tickets, reply=AUTO_REPLY)
    store.add_rule("acme", "support", "keep", {"status": "ok"}, actor="test")
    store.apply_rules("acme", "support")

    first = NamespaceWorkdir(one, PARTITION, store=store)
    corpus = run_corpus_stage(first, store, min_pairs=50)
    second = NamespaceWorkdir(two, PARTITION, store=store)
    assert not second.root.exists()
    run_recipe_stage(second)
    assert cid_for_file(second.corpus) == corpus.cid
    assert second.receipt_path("corpus").read_bytes() == first.receipt_path("corpus").read_bytes()
    holdout = store.latest_product(PARTITION, "holdout")
    assert holdout is not None and holdout.drawn_rows and cid_for_file(second.frozen_holdout) == holdout.cid

    # A third host, after the corpus's objects went: the chain cannot be rebuilt, and says why.
    store.mark_product_removed(store.latest_product(PARTITION, "corpus").id)
    third = NamespaceWorkdir(load_settings(tmp_path / "host-three").model_copy(update={"artifacts_url": objects}),
                             PARTITION, store=store)
    with pytest.raises(ProductMissing, match="removed by retention"):
        third.pull("recipe")
    shutil.rmtree(tmp_path / "bucket")
    store.close()


@pytest.fixture
def tiny_tickets():
    from kolm_pipeline.demo.tickets import generate_tickets

    return generate_tickets(120, seed=5)


def test_the_trainer_fetches_inputs_it_does_not_hold_by_cid(tmp_path, monkeypatch, tiny_base):
    """A training pod (its own KOLM_HOME) gets the train split by CID, resolves the base itself and refuses one
    whose weights differ from the job's."""
    from kolm_pipeline.corpus.train_config import TrainConfig
    from kolm_pipeline.train.base_model import BaseModelError, resolve_base_model
    from kolm_pipeline.train.job import TrainingJob
    from kolm_pipeline.train.pipes_entry import localized

    bucket = tmp_path / "bucket"
    monkeypatch.setenv("KOLM_ARTIFACTS_URL", f"file://{bucket}")
    monkeypatch.setenv("KOLM_HOME", str(tmp_path / "pod"))
    split = tmp_path / "orchestrator" / "train.jsonl"
    split.parent.mkdir()
    split.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    train_cid = Products(DirectoryStore(bucket)).put_file(split)
    base = resolve_base_model(str(tiny_base), tmp_path / "models")
    job = TrainingJob(task=PARTITION, base_model_id=base.model_id, base_model_path=tmp_path / "gone",
                      base_digest=base.digest, train_path=tmp_path / "orchestrator-only" / "train.jsonl",
                      output_dir=tmp_path / "orchestrator-only" / "adapter", recipe_cid="x", config=TrainConfig(),
                      mlflow_uri="sqlite:///x.db", mlflow_artifacts=tmp_path / "mlflow", train_cid=train_cid,
                      publish=True)
    local = localized(job)
    assert local.train_path.is_relative_to(tmp_path / "pod") and cid_for_file(local.train_path) == train_cid
    assert local.base_model_path == base.path
    with pytest.raises(BaseModelError, match="resolves to weights"):
        localized(job.model_copy(update={"base_digest": "sha256:" + "0" * 64}))


def test_a_second_demo_starts_from_the_bare_base_again(kolm_settings):
    """`kolm demo` on a home where it ran before: with the pointer file gone, the registry (where hosts without
    one read the champion) must say the task is back on the bare base, or the new candidate meets the old one."""
    from kolm_pipeline.demo.run import DEMO_NAMESPACE, DEMO_TENANT, reset_demo_namespace
    from kolm_pipeline.stages.deployment import current_champion

    task = f"{DEMO_TENANT}.{DEMO_NAMESPACE}"
    store = CaptureStore(kolm_settings.store_url)
    store.create_tenant(DEMO_TENANT)
    store.add_registry_row(task=task, from_cid=None, to_cid="bafkrei" + "a" * 52, k_before=0.2, k_after=0.9,
                           decision="swap", actor="test", details={})
    store.update_tripwire_state(task, lambda state: {"halted": True, "halt_reasons": ["an earlier demo"]})
    reset_demo_namespace(kolm_settings, store)
    assert not store.tripwire_state(task).get("halted")
    assert store.champions(task)[task] is None and current_champion(kolm_settings, task, store) is None
    assert store.registry_rows(task)[0].actor == "kolm demo"
    reset_demo_namespace(kolm_settings, store)  # nothing serves: no second row
    assert len(store.registry_rows(task)) == 2
    store.close()
