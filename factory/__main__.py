from factory.cli import app

app()
