"""Training tasks and their registry.

    translation  seq2seq Transformer on a parallel TSV corpus, dev BLEU   (translation.py)
    lm           decoder-only LM on a plain-text corpus, dev perplexity    (lm.py)
    vit_digits   ViT classifier on scikit-learn's 8x8 digits, accuracy     (vit_digits.py)
    classification  BERT/MiniLM text classifier on user tables, accuracy, macro-F1
                    (classification.py)
    summarization  seq2seq Transformer on a document/summary table, ROUGE  (summarization.py)
    distill      a small translation student from a teacher run (word/sequence KD)
                 (distill.py)
    distill_classifier  a small text classifier from a fine-tuned one (distill.py)
    qa           BERT/MiniLM extractive QA on SQuAD v1.1 JSON, EM/F1       (qa.py)

Every task module imports only `flaxformer_mini.tasks.base` (distill.py also the tasks it
distills); this file imports them and lists them by name. Your own task, in your own file::

    from flaxformer_mini import tasks

    class MyTask:                                  # implements tasks.Task
      def __init__(self, config, workdir): ...

    tasks.register_task('my_task', MyTask)        # then config.task = 'my_task'
"""

from __future__ import annotations

from flaxformer_mini.tasks.base import Batch, PyTree, Task, TaskFactory
from flaxformer_mini.tasks.classification import ClassificationTask
from flaxformer_mini.tasks.distill import ClassifierDistillationTask, DistillationTask
from flaxformer_mini.tasks.lm import LMTask
from flaxformer_mini.tasks.qa import QATask
from flaxformer_mini.tasks.summarization import SummarizationTask
from flaxformer_mini.tasks.translation import TranslationTask
from flaxformer_mini.tasks.vit_digits import ViTDigitsTask

BUILTIN_TASKS: dict[str, TaskFactory] = {
    'translation': TranslationTask,
    'lm': LMTask,
    'vit_digits': ViTDigitsTask,
    'classification': ClassificationTask,
    'summarization': SummarizationTask,
    'distill': DistillationTask,
    'distill_classifier': ClassifierDistillationTask,
    'qa': QATask,
}
_REGISTRY: dict[str, TaskFactory] = dict(BUILTIN_TASKS)


def register_task(name: str, factory: TaskFactory, *, overwrite: bool = False) -> None:
  """Registers ``factory(config, workdir) -> Task`` under ``name``."""
  if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
    raise ValueError(f'task {name!r} is already registered ({_REGISTRY[name]}); '
                     'pass overwrite=True to replace it')
  _REGISTRY[name] = factory


def registered_tasks() -> list[str]:
  return sorted(_REGISTRY)


def get_task(config, workdir: str) -> Task:
  """Builds the task named ``config.task``."""
  name = config.task
  if name not in _REGISTRY:
    raise ValueError(f'unknown task config.task={name!r}; known tasks: {registered_tasks()}')
  return _REGISTRY[name](config, workdir)
