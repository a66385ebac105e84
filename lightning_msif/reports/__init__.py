"""Turn a score matrix plus example metadata into views (tables, class matrix, histogram) and sinks."""
