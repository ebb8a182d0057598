"""The Streamlit UI: `streamlit run app/ui/Home.py`. A page per job to be done (pages/), reading only
the database and stored files; the model and training run in workers, never in the UI process."""
