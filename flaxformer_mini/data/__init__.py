"""Data: TFDS TSV builder, SentencePiece tokenizer, tokenize-once cache, grain pipeline."""

from flaxformer_mini.data.pipeline import (
    BATCH_KEYS,
    ConcatRows,
    PipelineConfig,
    make_dataset,
    pad_example,
    shift_right_per_segment,
    split_for_devices,
    translation_source,
)
from flaxformer_mini.data.tokenized import (
    TokenizedSource,
    as_text,
    read_chunks,
    read_examples,
    source_identity,
    tokenize_examples,
    tokenize_source,
)
from flaxformer_mini.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    check_vocab,
    load_tokenizer,
    train_tokenizer,
)
from flaxformer_mini.data.tsv_builder import (
    TsvTranslate,
    TsvTranslateConfig,
    embedded_paths,
    prepare_tsv_builder,
    read_tsv,
    shared_paths,
    tsv_builder,
)
