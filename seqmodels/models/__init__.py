"""The registry of model families: the one place a model type is named.

A config's `type:` is looked up here; everything else (training, decoding, evaluation, the
pyfunc, the CLI) asks the family (seqmodels.models.family). A new family is one module plus
one line below.
"""

from __future__ import annotations

from seqmodels.models.conv_seq2seq import ConvSeq2SeqFamily
from seqmodels.models.elman_lm import ElmanLMFamily
from seqmodels.models.family import LANGUAGE_MODEL, SEQUENCE_TO_SEQUENCE, ModelFamily
from seqmodels.models.hf_causal_lm import HFCausalLMFamily
from seqmodels.models.hf_masked_lm import HFMaskedLMFamily
from seqmodels.models.hf_seq2seq import HFSeq2SeqFamily
from seqmodels.models.lstm_seq2seq import LSTMSeq2SeqFamily
from seqmodels.models.ngram import NgramFamily
from seqmodels.models.recurrent_lm import RecurrentLMFamily
from seqmodels.models.transformer_lm import TransformerLMFamily
from seqmodels.models.transformer_seq2seq import TransformerSeq2SeqFamily

FAMILIES: dict[str, ModelFamily] = {
    "ngram": NgramFamily(),
    "lstm_lm": RecurrentLMFamily(cell="lstm"),
    "gru_lm": RecurrentLMFamily(cell="gru"),
    "rnn_lm": ElmanLMFamily(),
    "transformer_lm": TransformerLMFamily(),
    "lstm_seq2seq": LSTMSeq2SeqFamily(),
    "transformer_seq2seq": TransformerSeq2SeqFamily(),
    "conv_seq2seq": ConvSeq2SeqFamily(),
    "hf_causal_lm": HFCausalLMFamily(),
    "hf_seq2seq": HFSeq2SeqFamily(),
    "hf_masked_lm": HFMaskedLMFamily(),
}

__all__ = ["FAMILIES", "LANGUAGE_MODEL", "SEQUENCE_TO_SEQUENCE", "ModelFamily", "get_family"]


def get_family(model_type: str) -> ModelFamily:
    try:
        return FAMILIES[model_type]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown model type {model_type!r}; known: {known}") from None
