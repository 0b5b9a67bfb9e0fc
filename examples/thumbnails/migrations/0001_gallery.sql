-- The gallery: each video whose thumbnails were all made, and each thumbnail's file under the
-- app's storage directory. Portable SQL: SQLite by default, Postgres when DATABASE_URL says so.
CREATE TABLE videos (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    runner TEXT NOT NULL,
    thumbnails BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE thumbnails (
    video_id TEXT NOT NULL REFERENCES videos (id),
    idx BIGINT NOT NULL,
    runner TEXT NOT NULL,
    path TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (video_id, idx)
);
