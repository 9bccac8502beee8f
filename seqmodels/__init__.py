"""seqmodels: corpus URL to an evaluated, registered language or translation model.

The library never imports prefect or mlflow; orchestration lives in tasks/ and flows/.
Token-id conventions shared by every module (set when the SentencePiece model is trained):
pad=0, unk=1, bos=2, eos=3.
"""

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

__version__ = "0.1.0"
