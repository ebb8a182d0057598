"""Persistence: typed models (`db.models`), engines and sessions (`db.engine`), query helpers
(`db.repositories`) and the job queue (`db.queue`). Nothing here knows about the UI or the method."""
