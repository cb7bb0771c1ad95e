"""Retrieval-augmented answers through the MLflow AI Gateway.

Embeds a small document set with the gateway's embeddings endpoint, retrieves the documents closest to
the question by cosine similarity, and answers through the chat endpoint with a system prompt that
holds the retrieved context (the flow of the MosaicML Llama-2 announcement, with real retrieval).

    python examples/rag.py "How does the server avoid wasting KV cache memory?" [--gateway-url URL] [--json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import numpy as np
from mlflow.deployments import get_deploy_client

DOCUMENTS = [
    "Llama 2 is a family of pretrained and fine-tuned large language models from Meta, with 7, 13 and 70 "
    "billion parameters; the chat variants are tuned for dialogue with a [INST] <<SYS>> prompt format.",
    "Paged attention stores the KV cache in fixed-size blocks, like pages of virtual memory, so a sequence "
    "only holds the blocks it needs and memory is not lost to fragmentation or over-reservation.",
    "Continuous batching adds new requests to the running batch at every decoding step instead of waiting "
    "for the whole batch to finish, which keeps the GPU busy and cuts queueing delay.",
    "Prefix caching reuses the KV blocks of a shared prompt prefix, such as a long system prompt, across "
    "requests, so the prefill of that prefix is computed once.",
    "Tensor parallelism splits every weight matrix of the model across several GPUs; each GPU computes a "
    "slice and an all-reduce combines the partial results after each layer.",
    "The MLflow AI Gateway gives one place to configure model endpoints, credentials and rate limits, and "
    "applications query it with the deployments client instead of calling each provider directly.",
    "Ray Serve runs model replicas as actors on a Ray cluster, routes HTTP requests to them, restarts "
    "replicas whose health checks fail and scales the number of replicas with the load.",
    "API keys for the serving tier are stored only as hashes; each key can carry its own limits on "
    "requests and tokens per minute, and a revoked key stops working within seconds.",
]

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using only the context below. If the context "
    "does not contain the answer, say that you do not know.\n\nContext:\n{context}"
)


@dataclass
class Retrieved:
    document: str
    score: float


@dataclass
class RagAnswer:
    question: str
    retrieved: list[Retrieved]
    answer: str
    usage: dict


def embed(client, endpoint: str, texts: list[str]) -> np.ndarray:
    """Unit-length embeddings, one row per text, in input order."""
    response = client.predict(endpoint=endpoint, inputs={"input": texts})
    rows = sorted(response["data"], key=lambda item: item["index"])
    vectors = np.array([row["embedding"] for row in rows], dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def retrieve(
    question_vector: np.ndarray, document_vectors: np.ndarray, top_k: int
) -> list[tuple[int, float]]:
    """Indices and cosine similarities of the `top_k` closest documents, best first."""
    scores = document_vectors @ question_vector
    best = np.argsort(-scores)[:top_k]
    return [(int(i), float(scores[i])) for i in best]


def answer(
    question: str,
    gateway_url: str,
    chat_endpoint: str = "llama2-chat",
    embeddings_endpoint: str = "embeddings",
    top_k: int = 2,
    max_tokens: int = 128,
) -> RagAnswer:
    client = get_deploy_client(gateway_url)
    vectors = embed(client, embeddings_endpoint, [*DOCUMENTS, question])
    hits = retrieve(vectors[-1], vectors[:-1], top_k)
    context = "\n".join(f"- {DOCUMENTS[i]}" for i, _ in hits)
    response = client.predict(
        endpoint=chat_endpoint,
        inputs={
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT.format(context=context)},
                {"role": "user", "content": question},
            ],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        },
    )
    return RagAnswer(
        question=question,
        retrieved=[Retrieved(DOCUMENTS[i], score) for i, score in hits],
        answer=response["choices"][0]["message"]["content"],
        usage=response["usage"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("question")
    parser.add_argument("--gateway-url", default="http://127.0.0.1:5000")
    parser.add_argument("--chat-endpoint", default="llama2-chat")
    parser.add_argument("--embeddings-endpoint", default="embeddings")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = answer(
        args.question,
        args.gateway_url,
        args.chat_endpoint,
        args.embeddings_endpoint,
        args.top_k,
        args.max_tokens,
    )
    if args.json:
        print(json.dumps(asdict(result)))
        return
    print(f"Q: {result.question}\n\nRetrieved:")
    for hit in result.retrieved:
        print(f"  [{hit.score:.3f}] {hit.document}")
    print(f"\nA: {result.answer}\n\n({result.usage['total_tokens']} tokens)")


if __name__ == "__main__":
    main()
