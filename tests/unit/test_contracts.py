"""Each contract between the stages is defined once, in the core (``scmodels``), and every stage uses that one
definition: gene-id normalization, the vocabulary file and its hash, the export format version, file hashing,
atomic writes and named-vector tables."""
from __future__ import annotations

import numpy as np
import torch

from scpretrain.evaluate import align, classifier, export_io
from scpretrain.evaluate import vectors as ev_vectors
from scpretrain.scmodels import atomic, genes
from scpretrain.scmodels import vectors as core_vectors
from scpretrain.sharding import manifest as mf
from scpretrain.sharding import vocab as sh_vocab
from scpretrain.train import checkpoint, gene_embedding, init_from, published
from scpretrain.train import export as tr_export

IDS = [("ENSG00000141510.17", "ENSG00000141510"), ("ENSG00000182378.14_PAR_Y", "ENSG00000182378_PAR_Y"),
       ("ENST00000269305.9", "ENST00000269305"), ("ENSMUSG00000059552.5", "ENSMUSG00000059552"),
       (" TP53 ", "TP53"), ("AC000061.1", "AC000061.1"), ("MT-CO1", "MT-CO1")]


def test_gene_ids_are_normalized_by_one_function_everywhere():
    users = [sh_vocab.strip_version, align.strip_version, gene_embedding.strip_version, init_from.normalize_gene_id]
    assert all(f is genes.normalize_gene_id for f in users)
    assert [genes.normalize_gene_id(a) for a, _ in IDS] == [b for _, b in IDS]


def test_vocabulary_file_and_hash_have_one_definition(tmp_path):
    vocab = [("ENSG00000000003", "TSPAN6"), ("ENSG00000000005", "TNMD"), ("SYN1", "SYN1")]
    assert mf.vocab_sha256 is genes.vocab_sha256 and tr_export.vocab_sha256 is genes.vocab_sha256
    assert export_io.vocab_sha256 is genes.vocab_sha256
    mf.write_vocab(tmp_path / "corpus_vocab.tsv", vocab)
    from scpretrain.scmodels.build import build_model, default_preprocessing

    model = build_model("mae", {"n_genes": 3, "hidden": [4], "latent": 2})
    tr_export.export_model(tmp_path / "export", model, default_preprocessing("mae"), vocab)
    # the corpus's vocab.tsv and the export's are the same bytes; every reader gives the same genes
    assert (tmp_path / "corpus_vocab.tsv").read_bytes() == (tmp_path / "export" / genes.VOCAB_FILE).read_bytes()
    assert mf.read_vocab(tmp_path / "corpus_vocab.tsv") == vocab == export_io.load_export(tmp_path / "export").vocab
    assert export_io.load_export(tmp_path / "export").vocab_sha256 == genes.vocab_sha256([g for g, _ in vocab])


def test_export_format_version_is_one_number():
    assert export_io.SUPPORTED_FORMAT_VERSION == tr_export.EXPORT_FORMAT_VERSION == genes.EXPORT_FORMAT_VERSION


def test_file_hash_and_atomic_writes_come_from_the_core(tmp_path):
    for f in (mf.file_sha256, checkpoint.file_sha256, classifier.file_sha256, export_io.file_sha256,
              published.file_sha256):
        assert f is atomic.file_sha256
    assert checkpoint.write_atomic is atomic.write_atomic and mf.write_atomic is atomic.write_atomic
    p = atomic.write_atomic(tmp_path / "x.bin", b"abc")
    assert atomic.file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_vector_tables_read_the_same_in_train_and_evaluate(tmp_path):
    names = ["TP53", "CD4+ T cell", "GENE3"]
    mat = np.arange(9, dtype=np.float32).reshape(3, 3) / 7
    path = ev_vectors.write_vectors(tmp_path / "v.tsv", names, mat)
    for reader in (ev_vectors.read_vectors, core_vectors.read_vectors, gene_embedding.read_embedding_file):
        got_names, got = reader(path)
        assert got_names == names and np.array_equal(got, mat)
    assert torch.equal(torch.from_numpy(gene_embedding.read_embedding_file(path)[1]), torch.from_numpy(mat))


def test_a_misspelt_option_is_refused_before_any_work():
    import pytest

    from scpretrain import evaluate

    for fn, args in ((evaluate.finetune, (None, None, "cell_type")), (evaluate.annotate, (None, None)),
                     (evaluate.report, (None, None, "cell_type"))):
        with pytest.raises(evaluate.EvaluateError,
                           match=r"unknown option\(s\) \['lerning_rate'\]; reading options .*; training options"):
            fn(*args, lerning_rate=1e-3)  # model and cells are never looked at
    with pytest.raises(evaluate.EvaluateError, match=r"embed: unknown option\(s\) \['layers'\]; reading options"):
        evaluate.embed(None, None, layers="raw")
    read = evaluate.ReadOptions(layer="counts", verbose=False)
    from scpretrain.evaluate.options import split_options

    r, f = split_options("x", read, None, {"batch_size": 7, "max_epochs": 2})
    assert r == evaluate.ReadOptions(layer="counts", verbose=False, batch_size=7) and f.max_epochs == 2
    fit = evaluate.FitOptions(max_epochs=3, loss="gaussian_inflation")
    assert evaluate.FitOptions.of("x", fit, {"lr": 0.1}) == evaluate.FitOptions(max_epochs=3, loss="gaussian_inflation",
                                                                               lr=0.1)
    with pytest.raises(evaluate.EvaluateError, match="loss 'focal' is not one of"):
        evaluate.FitOptions(loss="focal")
