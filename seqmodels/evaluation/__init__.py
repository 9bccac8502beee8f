"""Evaluation: scoring a model on the test split, comparing models, deciding promotions.

- `scoring`: test-split metrics of a trained model, and the outputs a paired test needs later;
- `metrics`: BLEU/chrF/TER and the vocabulary-free language-model numbers;
- `rouge`: ROUGE F1 of summaries (rouge-score), its intervals and signature, the lead baseline;
- `significance`: confidence intervals and paired bootstrap tests of two models;
- `promotion`: the champion/challenger decision, its tags and its Markdown report;
- `comparison`: the table, Markdown report and plots comparing registered versions.

Nothing here imports Prefect or MLflow: tasks/ queries the registry, calls these functions
with plain values and logs what they return.
"""
