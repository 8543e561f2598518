"""The neuron viewer: static HTML pages (`mine export --format html`) and the same pages served on demand
(`mine serve`). html.py escapes, data.py reads the store, pages.py renders, site.py/server.py deliver."""
