"""Query the local stack through the MLflow AI Gateway (`make serve`, gateway_configs/local.yaml).

    python examples/quickstart.py [--gateway-url http://127.0.0.1:5000]

Uses `mlflow.deployments.get_deploy_client`, MLflow 3's replacement of `mlflow.gateway.query`, and the
OpenAI SDK on the gateway's OpenAI-compatible routes for streaming.
"""

from __future__ import annotations

import argparse

from mlflow.deployments import get_deploy_client
from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway-url", default="http://127.0.0.1:5000")
    args = parser.parse_args()

    client = get_deploy_client(args.gateway_url)
    print("endpoints:", ", ".join(e.name for e in client.list_endpoints()))

    chat = client.predict(
        endpoint="llama2-chat",
        inputs={
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is paged attention?"},
            ],
            "max_tokens": 32,
            "temperature": 0.0,
        },
    )
    print("chat:", chat["choices"][0]["message"]["content"], chat["usage"])

    completion = client.predict(
        endpoint="llama2-completions", inputs={"prompt": "Llamas are", "max_tokens": 16}
    )
    print("completion:", completion["choices"][0]["text"])

    vectors = client.predict(endpoint="embeddings", inputs={"input": ["hello", "world"]})
    print("embeddings:", len(vectors["data"]), "x", len(vectors["data"][0]["embedding"]))

    # The YAML gateway does not authenticate its callers (keep it on a trusted network) and holds the
    # serving key itself, so any api_key string does here.
    openai = OpenAI(base_url=f"{args.gateway_url}/v1", api_key="unused")
    stream = openai.chat.completions.create(
        model="llama2-chat",
        messages=[{"role": "user", "content": "Tell me a short story."}],
        max_tokens=32,
        stream=True,
    )
    print("stream:", end=" ", flush=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
