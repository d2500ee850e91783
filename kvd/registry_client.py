"""The registry API as nodes and gateways call it, over the one transport (L{kvd.transport.Peers})."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from attrs import define

from kvd.transport import Answer, Peers, PeerUnreachable

#: A registry's answers are small (a listing is about 100 bytes a node); more is not a registry.
REGISTRY_MAX_ANSWER = 256 * 1024


@define
class RegistryClient:
    """The registry API, as nodes and gateways use it."""

    peers: Peers
    base_url: str

    def _url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    async def register(self, node_id: str, url: str, weight: int, incarnation: int) -> tuple[int, Any]:
        body = json.dumps({"url": url, "weight": weight, "incarnation": incarnation}).encode()
        answer = await self.peers.call(
            "PUT", self._url(f"/registry/nodes/{quote(node_id, safe='')}"), body, max_answer=REGISTRY_MAX_ANSWER
        )
        return answer.status, _json_or_none(answer)

    async def leave(self, node_id: str, incarnation: int) -> int:
        answer = await self.peers.call(
            "DELETE",
            self._url(f"/registry/nodes/{quote(node_id, safe='')}?incarnation={incarnation}"),
            max_answer=REGISTRY_MAX_ANSWER,
        )
        return answer.status

    async def nodes(self, index: int | None = None, wait: float = 0) -> tuple[int, list[dict[str, Any]], str | None]:
        """The registry's change index, members and epoch; with C{index}, a long poll of C{wait} seconds."""
        path = "/registry/nodes"
        if index is not None:
            path += f"?index={index}&wait={wait:g}"
        answer = await self.peers.call(
            "GET", self._url(path), timeout=self.peers.timeout + wait, max_answer=REGISTRY_MAX_ANSWER
        )
        body = _json_or_none(answer)
        if answer.status != 200 or not isinstance(body, dict):
            raise PeerUnreachable(self.base_url, f"unexpected answer {answer.status}")
        nodes = body.get("nodes")
        if not isinstance(nodes, list) or not isinstance(body.get("index"), int):
            raise PeerUnreachable(self.base_url, "answer is not a registry listing")
        epoch = body.get("epoch")
        return body["index"], nodes, epoch if isinstance(epoch, str) else None


def _json_or_none(answer: Answer) -> Any:
    try:
        return answer.json()
    except ValueError:
        return None
