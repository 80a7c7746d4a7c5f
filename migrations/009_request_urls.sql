-- What a row asked for and what identifies it are stored apart: `url` is what is sent (the row's
-- URL with only a browser's changes), `normalized_url` the form duplicates share, `given_url` the
-- row's URL as written, for the export. Each is NULL when it is the same as `url`, as for most
-- rows, so a plain URL costs nothing more. Jobs stored before this have url = the normalized form.
ALTER TABLE requests ADD COLUMN normalized_url text, ADD COLUMN given_url text;
