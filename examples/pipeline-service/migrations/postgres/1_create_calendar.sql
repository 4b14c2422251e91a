-- The warehouse's time dimension: one row per calendar day from 2000-01-01 to 2099-12-31,
-- generated once. Facts carry a `date` (the UTC day of their event) that joins `date_key`;
-- reports group by its month (`month_key`, `YYYY-MM`) or year.
--
-- The dimensions and facts themselves are projections (versioned tables behind views,
-- created and filled by the service from the event history), not migrations.
CREATE TABLE dim_date (
    date_key   date    PRIMARY KEY,
    year       integer NOT NULL,
    quarter    integer NOT NULL CHECK (quarter BETWEEN 1 AND 4),
    month      integer NOT NULL CHECK (month BETWEEN 1 AND 12),
    month_key  text    NOT NULL,
    day        integer NOT NULL CHECK (day BETWEEN 1 AND 31),
    iso_week   integer NOT NULL CHECK (iso_week BETWEEN 1 AND 53),
    -- ISO day of the week: 1 is Monday, 7 Sunday.
    weekday    integer NOT NULL CHECK (weekday BETWEEN 1 AND 7),
    is_weekend boolean NOT NULL
);
CREATE INDEX dim_date_month ON dim_date (month_key);

INSERT INTO dim_date (date_key, year, quarter, month, month_key, day, iso_week, weekday, is_weekend)
SELECT d::date,
       extract(year FROM d)::integer,
       extract(quarter FROM d)::integer,
       extract(month FROM d)::integer,
       to_char(d, 'YYYY-MM'),
       extract(day FROM d)::integer,
       extract(week FROM d)::integer,
       extract(isodow FROM d)::integer,
       extract(isodow FROM d) IN (6, 7)
FROM generate_series(date '2000-01-01', date '2099-12-31', interval '1 day') AS d;
