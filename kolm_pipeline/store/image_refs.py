"""Which captures hold which images (capture/images.py): a namespace's live image bytes, for its byte limit, and
the images no capture inside its window refers to any more, for retention."""

from __future__ import annotations

from sqlalchemy import and_, delete, exists, func, select

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
