"""jacobi-engine serve, driven by the real openai client against a server started here on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from jacobi_engine.serve import Backend
from jacobi_engine.serve_app import build_app

TEACHER = Path(__file__).resolve().parents[1] / "jacobi_engine" / "assets" / "cllm-gsm8k" / "teacher"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
NAME = "teacher"


@pytest.fixture(scope="module")
def served():
    model = AutoModelForCausalLM.from_pretrained(str(TEACHER), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(TEACHER))
    tokenizer.chat_template = CHAT_TEMPLATE
    backend = Backend(model, tokenizer, NAME, {"block_size": 8, "init": "ngram"}, max_batch=3, max_seq_len=512)
    server = uvicorn.Server(uvicorn.Config(build_app(backend), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    yield model, tokenizer, client, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def hf_text(model, tokenizer, prompt_ids: list[int], max_tokens: int) -> tuple[str, int]:
    """HF greedy on the prompt alone: the text and the number of completion tokens (EOS included)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, len(prompt_ids) :].tolist()
    eos = model.generation_config.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


QUESTIONS = [
    "Question:\nTom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:\n",
    "Question:\nA train travels 60 km in 2 hours. What is its speed?\nAnswer:\n",
    "Question:\nSara reads 12 pages a day. How many pages does she read in a week?\nAnswer:\n",
    "Question:\nA box holds 24 pens. How many pens are in 3 boxes?\nAnswer:\n",
]


def test_completion_non_streaming_and_streaming_equal_hf_greedy(served):
    model, tokenizer, client, _ = served
    prompt = QUESTIONS[0]
    expected, count = hf_text(model, tokenizer, tokenizer(prompt)["input_ids"], 48)
    response = client.completions.create(model=NAME, prompt=prompt, max_tokens=48)
    assert response.choices[0].text == expected
    assert response.usage.completion_tokens == count
    assert response.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    jacobi = response.model_extra["jacobi"]
    assert jacobi["forwards"] >= 1 and jacobi["tokens_per_forward"] >= 1.0
    pieces = [
        chunk.choices[0].text
        for chunk in client.completions.create(model=NAME, prompt=prompt, max_tokens=48, stream=True)
    ]
    assert "".join(pieces) == expected and len(pieces) > 1


def test_chat_non_streaming_and_streaming_equal_hf_greedy(served):
    model, tokenizer, client, _ = served
    messages = [{"role": "user", "content": "What is 7 times 6?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected, _ = hf_text(model, tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"], 32)
    response = client.chat.completions.create(model=NAME, messages=messages, max_tokens=32)
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=32, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == expected


def test_concurrent_clients_each_get_their_greedy_output(served):
    model, tokenizer, client, _ = served
    expected = [hf_text(model, tokenizer, tokenizer(q)["input_ids"], 40)[0] for q in QUESTIONS]
    results = {}

    def ask(index):
        stream = index % 2 == 1
        if stream:
            chunks = client.completions.create(model=NAME, prompt=QUESTIONS[index], max_tokens=40, stream=True)
            results[index] = "".join(c.choices[0].text for c in chunks)
        else:
            results[index] = (
                client.completions.create(model=NAME, prompt=QUESTIONS[index], max_tokens=40).choices[0].text
            )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == dict(enumerate(expected))


def test_stop_strings_and_seeded_sampling(served):
    model, tokenizer, client, _ = served
    prompt = QUESTIONS[1]
    full, _ = hf_text(model, tokenizer, tokenizer(prompt)["input_ids"], 48)
    stop = full[len(full) // 3 : len(full) // 3 + 3]
    response = client.completions.create(model=NAME, prompt=prompt, max_tokens=48, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    first = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0.9, seed=7)
    again = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0.9, seed=7)
    assert first.choices[0].text == again.choices[0].text


def test_per_request_jacobi_settings(served):
    model, tokenizer, client, _ = served
    prompt = QUESTIONS[2]
    expected, _ = hf_text(model, tokenizer, tokenizer(prompt)["input_ids"], 32)
    response = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=32, extra_body={"jacobi": {"block_size": 4, "mode": "chunked"}}
    )
    assert response.choices[0].text == expected
    assert response.model_extra["jacobi"]["settings"]["block_size"] == 4


def test_client_disconnect_frees_its_row(served):
    model, tokenizer, client, base = served
    body = {"model": NAME, "prompt": QUESTIONS[3], "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", base + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # closed mid-stream: the server notices and frees the row
        deadline = time.time() + 30
        while http.get(base + "/health").json()["running"] != 0:
            assert time.time() < deadline, "the abandoned request kept its row"
            time.sleep(0.2)
    expected, _ = hf_text(model, tokenizer, tokenizer(QUESTIONS[0])["input_ids"], 16)
    assert client.completions.create(model=NAME, prompt=QUESTIONS[0], max_tokens=16).choices[0].text == expected


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": NAME, "prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"model": NAME, "prompt": ""}, 400, "prompt"),
        ({"model": "gpt-9", "prompt": "x"}, 404, "model"),
        ({"model": NAME, "prompt": "x", "jacobi": {"block_size": 0}}, 400, "jacobi"),
        ({"model": NAME, "prompt": "x", "jacobi": {"warp_drive": 1}}, 400, "jacobi"),
        ({"model": NAME, "prompt": "x", "max_tokens": 100000}, 400, None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, param):
    model, tokenizer, client, base = served
    response = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert client.completions.create(model=NAME, prompt=QUESTIONS[0], max_tokens=4).choices[0].text is not None


def test_openai_client_raises_on_bad_requests(served):
    _, _, client, base = served
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert httpx.post(base + "/v1/chat/completions", content=b"{not json", timeout=30).status_code == 400
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(base + "/health", timeout=30).json()["status"] == "ok"
