"""The feed spool of `dmad serve` (app/services/line/spool.py) and the feed under it: a batch that holds the
same image twice (two clients posting the same bytes at once) feeds one row and one score; a spooled
batch survives a round trip to disk; a batch that fails to feed is kept and does not hold back the others."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
from sqlalchemy import func, select

from app.services.line.feed import feed
from app.services.line.prediction import LineImage, LineModel
from app.services.line.spool import FeedSpool
from db.models import Image, PoolScore
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_same_image_twice_in_a_batch_and_a_spool_round_trip(ui_home: PreparedHome) -> None:  # noqa: F811
    home, sessions = ui_home.home, ui_home.sessions()
    line = LineModel.load(home, sessions)
    images = [LineImage.from_bytes(png(s), "tiles", keep_bytes=True) for s in (1, 1, 2)]
    results = line.score(images)
    spool = FeedSpool(home)
    path = spool.write(line.version_id, images, results)
    assert spool.pending() == [path] and spool.count_images() == 3
    back = FeedSpool.read(path)
    assert [i.data for i in back.images] == [i.data for i in images]
    assert [r.score for r in back.results] == [r.score for r in results]
    assert np.array_equal(back.results[0].patch_map, results[0].patch_map)

    def broken(*_: object) -> None:
        raise RuntimeError("this batch cannot be fed")

    other = spool.write(line.version_id, images[2:], results[2:])
    assert spool.replay(broken) == 0 and spool.pending() == [path, other]  # kept, both

    def feed_batch(version_id: int, imgs: list, res: list) -> None:
        with sessions() as session:
            feed(session, home, version_id, imgs, res)

    assert spool.replay(feed_batch) == 4 and spool.pending() == []
    with sessions() as session:
        for data in (png(1), png(2)):
            sha = LineImage.from_bytes(data, "tiles").content_hash
            image_ids = session.scalars(select(Image.id).where(Image.content_hash == sha)).all()
            assert len(image_ids) == 1
            assert session.scalar(select(func.count(PoolScore.id)).where(PoolScore.image_id == image_ids[0],
                                                                          PoolScore.version_id == line.version_id)) == 1
    # the batcher's feed never waits behind a replay: with the spool busy it leaves its file to the replayer
    third = spool.write(line.version_id, images[2:], results[2:])
    fed: list[int] = []
    with spool.lock:  # a replay feeding a backlog
        assert spool.feed_file(third, lambda *a: fed.append(1), wait=False) == 0
    assert fed == [] and spool.pending() == [third]  # kept for the replayer's next pass
    assert spool.replay(feed_batch) == 1 and spool.pending() == []
