"""A build split into independent tasks (--plan / --task / --finish) publishes the corpus the one-process build
publishes: the same cells in the same shards, in the same order, with the same checksums."""
from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scpretrain.sharding.__main__ import main
from scpretrain.sharding.build import BuildConfig, build, finish_build, plan_build, run_task
from scpretrain.sharding.check import verify
from scpretrain.sharding.errors import InputError
from scpretrain.sharding.tasks import Dealer, cut_tasks, input_blocks


def write_source(path: Path, n: int, genes: list[str], seed: int) -> Path:
    """Counts where about one cell in eight expresses fewer than 5 genes (dropped by --min-genes 5)."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.4, size=(n, len(genes))).astype(np.float32)
    sparse_rows = rng.random(n) < 0.125
    x[sparse_rows] = 0
    x[sparse_rows, :2] = 1
    obs = pd.DataFrame({"cell_type": rng.choice(["B", "T", "NK", "Mono"], n),
                        "donor": rng.choice([f"d{seed}-{i}" for i in range(5)], n)},
                       index=[f"s{seed}-c{i}" for i in range(n)])
    anndata.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("task_sources")
    genes = [f"GENE{i}" for i in range(80)]
    return [str(write_source(d / "a.h5ad", 700, genes[:60], 1)), str(write_source(d / "b.h5ad", 500, genes[20:], 2))]


def config(sources: list[str], out: Path, **kw) -> BuildConfig:
    return BuildConfig(sources=sources, out=out, cells_per_shard=200, keep_obs=["donor"], min_genes=5,
                       block_rows=64, progress=False, **kw)


def comparable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


def shard_obs(out: Path, n_shards: int) -> list[pd.DataFrame]:
    return [anndata.read_zarr(out / "zarr" / f"shard-{i:05d}.zarr").obs for i in range(n_shards)]


def test_three_tasks_out_of_order_build_the_one_process_corpus(sources, tmp_path):
    one = build(config(sources, tmp_path / "one"), log=lambda _m: None)
    out = tmp_path / "three"
    plan = plan_build(config(sources, out), 3, log=lambda _m: None)
    assert plan["tasks"] == 3 and [len(b) for b in plan["phase1_blocks"]] == [7, 6, 6]  # 19 blocks of 64 rows
    run_task(out, 2, 1, log=lambda _m: None)
    with pytest.raises(InputError, match=r"phase-1 task\(s\) 0, 1 of 3 have not finished"):
        run_task(out, 0, 2, log=lambda _m: None)
    for t in (2, 0, 1):  # task 2 again: already done, kept
        run_task(out, t, 1, log=lambda _m: None)
    run_task(out, 1, 2, log=lambda _m: None)
    with pytest.raises(InputError, match=r"shards not written yet \(e.g. shard 0, phase-2 task 0\)"):
        finish_build(out, log=lambda _m: None)
    for t in (2, 0):
        run_task(out, t, 2, log=lambda _m: None)
    three = finish_build(out, log=lambda _m: None)
    assert comparable(three) == comparable(one)
    assert [s["sha256"] for s in three["zarr"]["shards"]] == [s["sha256"] for s in one["zarr"]["shards"]]
    n = len(one["zarr"]["shards"])
    for a, b in zip(shard_obs(tmp_path / "one", n), shard_obs(out, n)):
        pd.testing.assert_frame_equal(a, b)
    assert verify(out) == [] and not (out / ".build").exists()
    # what the build dropped and kept: cell ids are 0..n-1 over the kept cells, every donor category is there
    assert one["n_cells"] < 1200 and one["sources"][0]["n_dropped_min_genes"] > 0
    ids = np.sort(np.concatenate([o["cell_id"].to_numpy() for o in shard_obs(out, n)]))
    assert np.array_equal(ids, np.arange(one["n_cells"]))
    assert len(one["obs_categories"]["donor"]) == 10


def test_the_cli_runs_a_planned_build_and_refuses_what_cannot_work(sources, tmp_path, capsys):
    ref = build(BuildConfig(sources=sources, out=tmp_path / "ref", cells_per_shard=200, keep_obs=["donor"],
                            progress=False), log=lambda _m: None)
    out = tmp_path / "cli"
    base = ["build", "--out", str(out), "--no-progress"]
    assert main([*base, *sum([["--source", s] for s in sources], []), "--cells-per-shard", "200",
                 "--keep-obs", "donor", "--plan", "--tasks", "3"]) == 0
    assert "planned 3 task(s) over 1,200 cells and 6 shards" in capsys.readouterr().out
    for phase in (1, 2):
        for t in range(3):
            assert main(["build", "--out", str(out), "--task", str(t), "--phase", str(phase)]) == 0
    assert main(["build", "--out", str(out), "--finish"]) == 0
    got = json.loads((out / "manifest.json").read_text())
    assert comparable(got) == comparable(ref)
    # refused, one line each, nothing published
    bad = tmp_path / "bad"
    for args, expected in (
            ([*sum([["--source", s] for s in sources], []), "--format", "both", "--plan", "--tasks", "2"],
             "a build split into tasks writes Zarr shards only"),
            (["--task", "0", "--phase", "1"], "no build plan; run `python -m sharding build --source"),
            (["--finish", "--source", sources[0]], "--task / --finish read everything from the plan"),
            (["--task", "0"], "--task I needs --phase 1 or --phase 2")):
        assert main(["build", "--out", str(bad), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1
        assert not (bad / "manifest.json").exists()


def test_dealing_is_a_function_of_the_block_alone():
    """A task that starts at block g replays the counts of the blocks before it: its destinations equal
    those of one dealer dealing every block in turn; every shard ends exactly at its capacity."""
    n_cells, rows = [1000, 333], 100
    blocks = input_blocks(n_cells, rows)
    whole = Dealer(sum(n_cells), 128, seed=7)
    dests = [whole.deal(g, b[2] - b[1]) for g, b in enumerate(blocks)]
    assert not whole.remaining.any()
    for first in (0, 5, 12):
        part = Dealer(sum(n_cells), 128, seed=7)
        for g in range(first):
            part.skip(g, blocks[g][2] - blocks[g][1])
        for g in range(first, len(blocks)):
            assert np.array_equal(part.deal(g, blocks[g][2] - blocks[g][1]), dests[g])
    cuts = cut_tasks(n_cells, rows, 4)
    assert sum(cuts, []) == list(range(len(blocks))) and all(cuts)
    assert cut_tasks([10], 64, 3) == [[0], [], []]  # more tasks than blocks: the extra ones are empty


def test_a_task_refuses_sources_changed_since_the_plan(sources, tmp_path):
    src = tmp_path / "a.h5ad"
    src.write_bytes(Path(sources[0]).read_bytes())
    out = tmp_path / "c"
    plan_build(config([str(src)], out), 2, log=lambda _m: None)
    run_task(out, 0, 1, log=lambda _m: None)
    write_source(src, 650, [f"GENE{i}" for i in range(60)], 9)  # the file is replaced between the tasks
    with pytest.raises(InputError, match="the sources changed since --plan"):
        run_task(out, 1, 1, log=lambda _m: None)


def test_counts_beyond_uint16_widen_one_tasks_spool_and_every_value_survives(tmp_path):
    """Counts are spooled as uint16 until a value does not fit (a deep gene at 70,000, a normalized 2.5): that
    task's spool is rewritten as float32 once, the other tasks' stay uint16, and phase 2 merges both. Explicit
    zeros in the source are dropped without touching the source's arrays."""
    rng = np.random.default_rng(3)
    x = rng.poisson(0.6, size=(300, 40)).astype(np.float32)
    x[:, 0] = 1  # every cell expresses at least one gene
    x[260, 3], x[270, 4] = 70_000, 2.5  # in the last of 5 blocks of 64 rows: the third task's
    m = sp.csr_matrix(x)
    m.data[m.indices == 7] = 0  # stored zeros
    src = tmp_path / "wide.h5ad"
    anndata.AnnData(m, var=pd.DataFrame(index=[f"G{i}" for i in range(40)])).write_h5ad(src)

    def cfg(out: Path) -> BuildConfig:
        return BuildConfig(sources=[str(src)], out=out, cells_per_shard=100, block_rows=64, allow_non_integer=True,
                           progress=False)

    one = build(cfg(tmp_path / "one"), log=lambda _m: None)
    out = tmp_path / "three"
    plan_build(cfg(out), 3, log=lambda _m: None)
    for phase in (1, 2):
        for t in range(3):
            run_task(out, t, phase, log=lambda _m: None)
    spools = sorted((out / ".build").glob("p1-*/data.float32"))
    assert [p.parent.name for p in spools] == ["p1-00002"]
    three = finish_build(out, log=lambda _m: None)
    assert comparable(three) == comparable(one)
    x[:, 7] = 0
    for shard in one["zarr"]["shards"]:
        a = anndata.read_zarr(tmp_path / "one" / shard["path"])
        got = a.X.toarray()
        np.testing.assert_array_equal(got, x[a.obs["cell_id"].to_numpy()])
        assert a.X.dtype == (np.float32 if (got % 1).any() or got.max() > 65535 else np.uint16)
        assert a.X.nnz == np.count_nonzero(got)
    assert sum(anndata.read_zarr(tmp_path / "one" / s["path"]).X.dtype == np.float32
               for s in one["zarr"]["shards"]) >= 1


def test_an_unfinished_build_with_an_older_spool_format_starts_over(sources, tmp_path):
    """A plan whose spool an earlier version wrote (float32/int32 files) is not resumed: read back with this
    version's dtypes it would be garbage."""
    out = tmp_path / "c"
    plan_build(config(sources, out), 1, log=lambda _m: None)
    path = out / ".build" / "plan.json"
    plan = json.loads(path.read_text())
    plan["fingerprint"] = plan["fingerprint"].rsplit("/spool=", 1)[0]  # as the version before the uint16 spool
    path.write_text(json.dumps(plan))
    lines: list[str] = []
    m = build(config(sources, out), log=lines.append)
    assert any("starting over" in ln for ln in lines) and verify(out) == [] and m["n_cells"] > 0
