"""The Streamlit operator console; it reads only the collector's HTTP API."""
