"""Token-length statistics (lengths.py) on a tiny real WordPiece tokenizer."""

from __future__ import annotations

import pytest

from optical_kernels.distill.lengths import count_words, token_length_stats

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def wordpiece():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "lord", "is", "good", "ya", "##he",
             "##we", "nd", "##i", "##wa", "##bwi", "##no", "q", "##uery", ":"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                pad_token="[PAD]")


def test_pieces_per_word_and_truncation(wordpiece):
    english = ["the lord is good"]  # 4 words, 4 pieces: 6 tokens with [CLS]/[SEP]
    bantu = ["yahewe ndiwabwino"]  # 2 words: ya ##he ##we / nd ##i ##wa ##bwi ##no: 8 pieces
    en = token_length_stats(wordpiece, english, max_lengths=(4, 6, 8))
    assert en["words"] == 4 and en["pieces"] == 4 and en["pieces_per_word"] == 1.0
    assert en["max_tokens"] == 6
    assert en["truncated"] == {4: 1.0, 6: 0.0, 8: 0.0}  # cut only when longer than L
    ny = token_length_stats(wordpiece, bantu, max_lengths=(8, 10))
    assert ny["pieces"] == 8 and ny["pieces_per_word"] == 4.0 and ny["max_tokens"] == 10
    assert ny["truncated"] == {8: 1.0, 10: 0.0}
    # the prefix counts towards the length (not towards the pieces per word)
    pre = token_length_stats(wordpiece, english, prefix="query: ", max_lengths=(8,))
    assert pre["pieces"] == 4 and pre["max_tokens"] == 9 and pre["truncated"] == {8: 1.0}
    both = token_length_stats(wordpiece, english + bantu, max_lengths=(8,), batch_size=1)
    assert both["n_texts"] == 2 and both["truncated"] == {8: 0.5}
    assert both["mean_tokens"] == 8.0 and both["median_tokens"] == 8.0


def test_empty_and_bad_arguments(wordpiece):
    empty = token_length_stats(wordpiece, [])
    assert empty["n_texts"] == 0 and empty["pieces_per_word"] == 0.0
    assert set(empty["truncated"]) == {64, 128, 256}
    with pytest.raises(ValueError, match="max_lengths"):
        token_length_stats(wordpiece, ["x"], max_lengths=(0,))
    with pytest.raises(ValueError, match="batch_size"):
        token_length_stats(wordpiece, ["x"], batch_size=0)


def test_count_words_splits_the_ethiopic_wordspace():
    assert count_words("the lord  is\tgood") == 4
    assert count_words("እያንዳንዱ፡ሰው፡የዘር፡") == 3  # Amharic: U+1361 between words
    assert count_words("") == 0
