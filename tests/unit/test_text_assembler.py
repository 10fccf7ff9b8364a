"""TextAssembler: detokenizing + stop matching + EOS, with the real tokenizer."""
from jobs.chat_format import raw_tokenizer
from workers.text.output import TextAssembler

TOK = raw_tokenizer()


def feed_all(assembler, ids, chunk=1):
    out = [assembler.feed(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return "".join(out) + assembler.finish()


def test_plain_text_round_trips_and_counts_tokens():
    ids = TOK.encode("Hello wörld, 日本語 😀!", bos=False, eos=False)
    a = TextAssembler(TOK, [])
    assert feed_all(a, ids) == "Hello wörld, 日本語 😀!" == a.text
    assert a.token_count == len(ids) and a.finish_reason is None and a.done


def test_stop_spanning_tokens_truncates_and_counts_up_to_the_match():
    ids = TOK.encode("one two three four", bos=False, eos=False)
    a = TextAssembler(TOK, ["o th"])
    assert feed_all(a, ids, chunk=2) == "one tw"
    assert a.finish_reason == "stop"
    assert a.token_count < len(ids)


def test_eos_ends_text_releases_held_prefix_and_is_counted():
    ids = TOK.encode("abc ab", bos=False, eos=False) + [TOK.eos_id] + TOK.encode("zzz", bos=False, eos=False)
    a = TextAssembler(TOK, ["abx"])
    assert feed_all(a, ids) == "abc ab"  # "ab" was held as a possible start of "abx", then released at EOS
    assert a.finish_reason == "stop" and a.token_count == len(TOK.encode("abc ab", bos=False, eos=False)) + 1


def test_held_prefix_released_at_length_end():
    ids = TOK.encode("hello wor", bos=False, eos=False)
    a = TextAssembler(TOK, ["world"])
    assert feed_all(a, ids) == "hello wor" and a.finish_reason is None
