"""The MLflow pyfunc for every seqmodels model ("models from code": MLflow runs this file).

`predict` takes a list of strings (or a one-column DataFrame) and a `task` param:
- "translate" (translation models): returns the translations;
- "summarize" (summarisation models): returns the summaries;
- "generate" (language models): returns a continuation of each prompt;
- "score" (language models): returns each line's perplexity per token, as text.
The default task is the model's natural one (of the experiment task it was trained for).
Model code travels with the model (code_paths), so loading needs only the Python packages,
not this repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import set_model


class SeqModelPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from seqmodels.models.folder import NATURAL_TASKS, load_predictor, read_model_meta

        folder = Path(context.artifacts["model_dir"])
        self.predictor = load_predictor(folder)
        meta_task = read_model_meta(folder).get("task", "")
        self.default_task = NATURAL_TASKS.get(meta_task, self.predictor.default_task)

    # The input hint is a DataFrame because that is what MLflow hands over for the signature's
    # one string column; with it MLflow neither warns nor re-validates (lists still work).
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        params = dict(params or {})
        if isinstance(model_input, pd.DataFrame):
            texts = [str(x) for x in model_input.iloc[:, 0]]
        elif isinstance(model_input, str):
            texts = [model_input]
        else:
            texts = [str(x) for x in model_input]
        task = params.pop("task", None) or self.default_task
        return self._run(task, texts, params)

    def _run(self, task: str, texts: list[str], params: dict) -> list[str]:
        if task == "translate":
            return self.predictor.translate(texts)
        if task == "summarize":
            return self.predictor.summarize(texts)
        if task == "generate":
            top_k, seed = int(params.get("top_k") or 0), params.get("seed")
            return self.predictor.generate(
                texts,
                max_new_tokens=int(params.get("max_new_tokens", 60)),
                temperature=float(params.get("temperature", 0.8)),
                top_k=top_k if top_k > 0 else None,  # 0: no top-k filtering
                seed=int(seed) if seed is not None and int(seed) >= 0 else None,  # -1: random
            )
        if task == "score":
            return [f"{ppl:.4f}" for ppl in self.predictor.perplexities(texts)]
        raise ValueError(f"unknown task {task!r}: use translate, summarize, generate or score")


set_model(SeqModelPyfunc())
