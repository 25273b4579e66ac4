"""Serving-engine integrations.

``scheduler`` and ``worker`` hold the connector logic and import no serving engine, so they run
and are tested anywhere; ``vllm`` adapts them to vLLM's ``KVConnectorBase_V1`` and is the only
module that imports vLLM.
"""
