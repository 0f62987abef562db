"""Which captures hold which images (capture/images.py): a namespace's live image bytes, for its byte limit, and
the images no capture inside its window refers to any more, for retention."""

from __future__ import annotations

import json

from sqlalchemy import and_, delete, exists, func, insert, select, update

from kolm_pipeline.store.base import StoreBase
from kolm_pipeline.store.tables import capture_images, captures

_CHUNK = 500


def _live():
    """A capture that still holds its text refers to the image row's digest."""
    return exists().where(and_(captures.c.request_id == capture_images.c.request_id, captures.c.expired_at.is_(None)))


class ImageRefQueries(StoreBase):
    """Image references of captures."""

    def image_bytes(self, tenant: str, namespace: str) -> int:
        """Bytes of the distinct images the namespace's live captures refer to."""
        t = capture_images.c
        distinct_images = (select(t.digest, func.max(t.bytes).label("bytes"))
                           .where(t.tenant == tenant, t.namespace == namespace, _live())
                           .group_by(t.digest).subquery())
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(distinct_images.c.bytes), 0))).scalar() or 0)

    def live_image_digests(self, tenant: str, namespace: str) -> set[str]:
        """The images the namespace's live captures refer to (counted once against its byte limit)."""
        t = capture_images.c
        with self.engine.connect() as conn:
            return set(conn.execute(select(t.digest).where(t.tenant == tenant, t.namespace == namespace, _live())
                                    .distinct()).scalars())

    def capture_image_digests(self, request_id: str) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(capture_images.c.digest).where(
                capture_images.c.request_id == request_id).order_by(capture_images.c.digest)).scalars())

    def dead_image_digests(self) -> list[str]:
        """Images no live capture refers to: their captures expired or were deleted."""
        refs = capture_images.alias("live_refs")  # its own FROM: an image any live capture refers to stays
        live = (select(refs.c.digest)
                .where(exists().where(and_(captures.c.request_id == refs.c.request_id,
                                           captures.c.expired_at.is_(None))))
                .distinct())
        t = capture_images.c
        with self.engine.connect() as conn:
            return list(conn.execute(select(t.digest).where(t.digest.not_in(live)).distinct()).scalars())

    def captures_with_image_url(self, tenant: str, namespace: str, url: str) -> list[int]:
        """Live captures of the namespace whose messages give an image by `url` (OpenAI or Anthropic form)."""
        c = captures.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(c.id, c.input_json).where(
                c.tenant == tenant, c.namespace == namespace, c.expired_at.is_(None),
                c.input_json.contains(url, autoescape=True))).all()
        return [row.id for row in rows if _replace_url(json.loads(row.input_json), url, "")[1]]

    def attach_image_by_url(self, tenant: str, namespace: str, url: str, digest: str, media_type: str,
                            size: int) -> list[int]:
        """Make every live capture of the namespace that gave an image by `url` refer to the stored image `digest`
        instead (an operator imported its bytes), in one transaction with their references; returns their ids."""
        c = captures.c
        changed = []
        with self.engine.begin() as conn:
            rows = conn.execute(select(c.id, c.request_id, c.input_json).where(
                c.tenant == tenant, c.namespace == namespace, c.expired_at.is_(None),
                c.input_json.contains(url, autoescape=True))).all()
            for row in rows:
                messages, found = _replace_url(json.loads(row.input_json), url, digest, media_type)
                if not found:
                    continue
                conn.execute(update(captures).where(c.id == row.id).values(
                    input_json=json.dumps(messages, ensure_ascii=False, separators=(",", ":"))))
                exists_already = conn.execute(select(capture_images.c.digest).where(
                    capture_images.c.request_id == row.request_id, capture_images.c.digest == digest)).first()
                if exists_already is None:
                    conn.execute(insert(capture_images).values(request_id=row.request_id, tenant=tenant,
                                                               namespace=namespace, digest=digest,
                                                               media_type=media_type, bytes=size))
                changed.append(row.id)
        return changed

    def referenced_images(self) -> set[str]:
        """Every digest a capture refers to, live or not."""
        with self.engine.connect() as conn:
            return set(conn.execute(select(capture_images.c.digest).distinct()).scalars())

    def forget_dead_images(self, digests: list[str]) -> list[str]:
        """Drop the references of `digests` that no live capture holds, and return those no reference is left to
        at all: only their bytes may go. A capture that refers to one of them since `dead_image_digests` keeps its
        reference, and its image (the writer also puts an image back that vanished under its new reference)."""
        gone: list[str] = []
        t = capture_images.c
        with self.engine.begin() as conn:
            for start in range(0, len(digests), _CHUNK):
                chunk = digests[start:start + _CHUNK]
                conn.execute(delete(capture_images).where(t.digest.in_(chunk), ~_live()))
                left = set(conn.execute(select(t.digest).where(t.digest.in_(chunk)).distinct()).scalars())
                gone += [digest for digest in chunk if digest not in left]
        return gone


def _replace_url(messages: list, url: str, digest: str, media_type: str = "") -> tuple[list, bool]:
    """`messages` with each image part given by `url` turned into a reference to the stored image `digest`, and
    whether there was one."""
    found = False

    def part_of(part):
        nonlocal found
        if not isinstance(part, dict):
            return part
        holder = part.get("image_url")
        if part.get("type") == "image_url" and isinstance(holder, dict) and holder.get("url") == url:
            found = True
            return {**part, "image_url": {**holder, "url": f"kolm-image:sha256:{digest}"}}
        source = part.get("source")
        if part.get("type") == "image" and isinstance(source, dict) and source.get("type") == "url" \
                and source.get("url") == url:
            found = True
            return {**part, "source": {"type": "kolm-image", "media_type": media_type, "digest": f"sha256:{digest}"}}
        if part.get("type") == "tool_result" and isinstance(part.get("content"), list):
            return {**part, "content": [part_of(inner) for inner in part["content"]]}
        return part

    out = [{**m, "content": [part_of(p) for p in m["content"]]} if isinstance(m, dict)
           and isinstance(m.get("content"), list) else m for m in messages]
    return out, found
