"""Gene alignment: Ensembl ids with versions, symbols, var columns, derived vocabularies, coverage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from scpretrain.sharding import manifest as mf
from scpretrain.sharding.errors import InputError
from scpretrain.sharding.vocab import SourceGenes, Vocab, align, check_coverage, derive_vocab, strip_version

VOCAB = Vocab.from_pairs([("ENSG00000000003", "TSPAN6"), ("ENSG00000000005", "TNMD"),
                          ("ENSG00000000419", "DPM1"), ("ENSG00000182378_PAR_Y", "PLCXD1")])


def test_strip_version() -> None:
    assert strip_version("ENSG00000141510.17") == "ENSG00000141510"
    assert strip_version("ENSMUSG00000064370.1") == "ENSMUSG00000064370"
    assert strip_version("ENSG00000182378.14_PAR_Y") == "ENSG00000182378_PAR_Y"
    assert strip_version("TP53") == "TP53" and strip_version("MT-CO1.2") == "MT-CO1.2"


def test_align_by_versioned_ensembl_ids() -> None:
    genes = SourceGenes(["ENSG00000000419.12", "ENSG99999999999.1", "ENSG00000000003.15",
                         "ENSG00000182378.14_PAR_Y"])
    a = align(genes, VOCAB)
    assert a.col_map.tolist() == [2, -1, 0, 3]
    assert a.matched_by == "var_names (Ensembl, versions stripped) -> vocab gene_id"
    assert (a.n_matched, a.gene_coverage, a.vocab_coverage) == (3, 0.75, 0.75)


def test_align_by_symbol_in_var_names_or_column() -> None:
    a = align(SourceGenes(["DPM1", "TNMD", "NOPE"]), VOCAB)
    assert a.col_map.tolist() == [2, 1, -1] and a.matched_by == "var_names -> vocab symbol"
    # var_names are barcodes-like junk, the symbols live in var['feature_name']
    b = align(SourceGenes(["g1", "g2"], {"feature_name": ["TSPAN6", "DPM1"]}), VOCAB)
    assert b.col_map.tolist() == [0, 2] and b.matched_by == "var['feature_name'] -> vocab symbol"


def test_two_source_genes_on_one_vocab_gene_keep_the_first() -> None:
    a = align(SourceGenes(["ENSG00000000005.1", "ENSG00000000005.2", "ENSG00000000003.1"]), VOCAB)
    assert a.col_map.tolist() == [1, -1, 0]


def test_apply_reorders_and_drops_columns() -> None:
    a = align(SourceGenes(["DPM1", "NOPE", "TSPAN6"]), VOCAB)
    x = sp.csr_matrix(np.array([[1, 2, 3], [0, 5, 0], [4, 0, 0]], dtype=np.float32))
    y = a.apply(x)
    assert y.shape == (3, 4) and y.has_sorted_indices
    np.testing.assert_array_equal(y.toarray(), [[3, 0, 1, 0], [0, 0, 0, 0], [0, 0, 4, 0]])


def test_coverage_refusal_message() -> None:
    a = align(SourceGenes(["DPM1", "X1", "X2", "X3", "X4"]), VOCAB)
    check_coverage(a, file="s.h5ad", min_coverage=0.2)
    with pytest.raises(InputError, match=r"^s\.h5ad: var: only 1 of 5 genes \(20\.0%\) match the vocabulary"):
        check_coverage(a, file="s.h5ad", min_coverage=0.5)


def test_derive_vocab_unions_ids_and_symbols_in_first_seen_order() -> None:
    first = SourceGenes(["ENSG00000000003.4", "ENSG00000000005.1"], {"feature_name": ["TSPAN6", "TNMD"]})
    second = SourceGenes(["TNMD", "NEW1", "TSPAN6", "NEW2"])
    v = derive_vocab([first, second])
    assert v.pairs() == [("ENSG00000000003", "TSPAN6"), ("ENSG00000000005", "TNMD"), ("NEW1", "NEW1"),
                         ("NEW2", "NEW2")]
    assert align(second, v).gene_coverage == 1.0


def test_vocab_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "vocab.tsv"
    mf.write_vocab(path, VOCAB.pairs())
    assert mf.read_vocab(path) == VOCAB.pairs() and mf.read_vocab(tmp_path) == VOCAB.pairs()
    assert mf.vocab_sha256(VOCAB.gene_ids) == __import__("hashlib").sha256(
        "\n".join(VOCAB.gene_ids).encode()).hexdigest()
    path.write_text("gene\tsym\nA\ta\n")
    with pytest.raises(InputError, match="first line must be the header"):
        mf.read_vocab(path)
    path.write_text("gene_id\tsymbol\nA\ta\nA\tb\n")
    with pytest.raises(InputError, match=r"gene_id has 1 duplicates \(e\.g\. A\)"):
        mf.read_vocab(path)


def test_apply_fast_paths_keep_rows_sorted() -> None:
    unsorted = sp.csr_matrix((np.array([5.0, 7.0, 1.0], dtype=np.float32), np.array([3, 0, 2]),
                              np.array([0, 2, 3])), shape=(2, 4))
    assert not unsorted.has_sorted_indices
    before = (unsorted.data.copy(), unsorted.indices.copy())
    identity = align(SourceGenes(["TSPAN6", "TNMD", "DPM1", "PLCXD1"]), VOCAB)
    y = identity.apply(unsorted)
    assert y.has_sorted_indices and y.indices.dtype == np.int32
    np.testing.assert_array_equal(y.toarray(), unsorted.toarray())
    subset = align(SourceGenes(["TSPAN6", "NOPE", "DPM1", "PLCXD1"]), VOCAB)  # order kept, one dropped
    z = subset.apply(unsorted)
    assert z.has_sorted_indices
    np.testing.assert_array_equal(z.toarray(), [[7, 0, 0, 5], [0, 0, 1, 0]])
    sorted_rows = subset.apply(sp.csr_matrix(np.array([[1, 2, 3, 4]], dtype=np.float32)))
    np.testing.assert_array_equal(sorted_rows.toarray(), [[1, 0, 3, 4]])
    # the input's arrays are the source block's (the build no longer copies a block before aligning it)
    np.testing.assert_array_equal(unsorted.data, before[0])
    np.testing.assert_array_equal(unsorted.indices, before[1])


def test_one_vocabulary_hash_and_one_export_format_version_on_every_side():
    """The contract lives once in the core (scmodels.genes); corpus, export writer and export reader use it."""
    from scpretrain.evaluate import export_io
    from scpretrain.scmodels import genes
    from scpretrain.train import export

    assert mf.vocab_sha256 is genes.vocab_sha256 and export.vocab_sha256 is genes.vocab_sha256
    assert export_io.vocab_sha256 is genes.vocab_sha256
    assert export.EXPORT_FORMAT_VERSION == export_io.SUPPORTED_FORMAT_VERSION == genes.EXPORT_FORMAT_VERSION
