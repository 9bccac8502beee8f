"""What a registered language model does for its users (registration and promotion themselves
are tested in test_promotion.py)."""

from __future__ import annotations

from seqmodels.models.folder import load_predictor


def test_language_model_continuations_run_across_line_ends(tiny_ngram_dir):
    predictor = load_predictor(tiny_ngram_dir)
    # The training lines all end after "long", so a continuation must cross line ends.
    text = predictor.generate(["ROMEO: the night is dark and long"], max_new_tokens=60, seed=3)[0]
    lines = text.split("\n")
    assert lines[0] == "" and len(lines) >= 3
    assert all(line.startswith("ROMEO: the night") for line in lines[1:-1])
    assert (
        text
        == predictor.generate(["ROMEO: the night is dark and long"], max_new_tokens=60, seed=3)[0]
    )


def test_line_nll_adds_up_to_the_total_and_ranks_familiar_lines_higher(tiny_ngram_dir):
    predictor = load_predictor(tiny_ngram_dir)
    lines = ["ROMEO: the night is dark and long", "long and dark the ROMEO night"]
    per_line = predictor.line_nll(lines)
    total, n_tokens = predictor.total_nll(lines)
    assert abs(per_line.sum() - total) < 1e-6 * total
    assert n_tokens == predictor.n_predicted(lines)
    assert per_line[0] < per_line[1]  # the line it was trained on is far more likely
