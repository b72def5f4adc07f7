"""The strawman the benchmark compares against: Flask + `gunicorn -w 2`, a pickled module torch.load-ed at
import, JSON in and out. Benchmarks only -- Kit itself never unpickles a model.

    NAIVE_MODEL=/path/model.pkl gunicorn -w 2 -b 127.0.0.1:9000 naive_app:app
"""

import os

import torch
from flask import Flask, jsonify, request

model = torch.load(os.environ["NAIVE_MODEL"], weights_only=False)  # the strawman: a full pickle
model.eval()
app = Flask(__name__)


@app.post("/predict")
def predict():
    x = torch.tensor(request.get_json()["inputs"], dtype=torch.float32)
    with torch.no_grad():
        y = model(x)
    return jsonify({"outputs": y.tolist()})
