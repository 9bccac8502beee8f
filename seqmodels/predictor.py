"""Where models registered before the model-family registry find their loader.

Their MLflow pyfunc (stored with each registered version, tasks/pyfunc_model.py of that
time) runs `from seqmodels.predictor import load_predictor`. In a process that has already
imported this package (the pipeline re-scoring an old champion, `seqmodels translate`), that
import resolves here, so such versions keep loading; new versions use
seqmodels.models.folder directly.
"""

from seqmodels.models.folder import load_predictor

__all__ = ["load_predictor"]
