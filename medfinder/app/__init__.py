"""The app's service, behind ``app.py``'s Gradio layout: the shared searcher, the upload
lifecycle, the JSON API and the event handlers. ``app.py`` holds the layout alone."""
