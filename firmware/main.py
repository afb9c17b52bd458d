# Runs after boot.py: start the job runner. Everything else lives in app.py.
import app

app.main()
