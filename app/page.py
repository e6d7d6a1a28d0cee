"""The Streamlit page: pick a trained variant, upload X-rays, see the decision and why.

Start it with `python -m cxrlab.cli.page` from the project root. Uploads stay
in memory (Streamlit's UploadedFile) and are decoded from there exactly as
the prediction command decodes files, within the same size limits
(`data.max_image_pixels`, checked before decoding, and `data.min_image_side`);
nothing is written to disk.
"""

from __future__ import annotations

import io

import numpy as np
import streamlit as st

from cxrlab.config.load import load_params
from cxrlab.data.images import IMAGE_SUFFIXES
from cxrlab.explain.cam import overlay
from cxrlab.serving.predict import Predictor, decode, variant_predictor
from cxrlab.serving.webapp import class_names, metrics_table, page_title, trained_variants

DISPLAY_WIDTH = 256  # px on the page; small training sizes are scaled up


@st.cache_resource(show_spinner="Loading the model...")
def predictor_for(variant: str) -> Predictor:
    return variant_predictor(variant, precision=load_params().runtime.inference_precision)


def show_result(name: str, image: np.ndarray, predictor: Predictor) -> None:
    """Probabilities, the decision and the Grad-CAM overlay of one decoded image."""
    probs = predictor.probabilities(image[None])[0]
    decision = predictor.decisions(probs[None])[0]
    explained = predictor.explained_class(probs)
    heatmap = predictor.heatmaps(image[None], explained)[0]
    st.subheader(name)
    left, middle, right = st.columns(3)
    left.image(image.transpose(1, 2, 0), width=DISPLAY_WIDTH,
               caption=f"as the model sees it ({predictor.image_size} px)")
    middle.image(overlay(image, heatmap), width=DISPLAY_WIDTH,
                 caption=f"Grad-CAM: where the model sees {predictor.classes[explained]}")
    with right:
        st.markdown(f"**Decision: {decision}**")
        st.caption(f"by {predictor.rule}; scored in {predictor.precision}")
        for cls, p in zip(predictor.classes, probs):
            st.progress(float(p), text=f"p({cls}) = {p:.3f}")


params = load_params()
st.set_page_config(page_title="Chest X-ray classifier", layout="wide")
st.title(page_title(class_names(params)))
st.caption("A research model trained by this pipeline, not a medical device.")

variants = trained_variants(params)
if not variants:
    st.error("No trained variant in models/: run `dvc repro` first.")
    st.stop()
variant = st.sidebar.selectbox("Trained variant", variants)
predictor = predictor_for(variant)
st.sidebar.markdown(f"`{predictor.path}`  \n{predictor.ckpt['arch']}, {predictor.image_size} px, "
                    f"classes {', '.join(predictor.classes)}  \ndecides by {predictor.rule}"
                    + (f"  \n{predictor.fold_note}" if predictor.fold_note else ""))

uploads = st.file_uploader("Chest X-rays", type=sorted(s.lstrip(".") for s in IMAGE_SUFFIXES),
                           accept_multiple_files=True)
for upload in uploads or []:
    result = decode(io.BytesIO(upload.getvalue()), predictor.image_size, params.data.max_image_pixels,
                    params.data.min_image_side)
    if isinstance(result, str):
        st.error(f"{upload.name}: {result}. Upload a PNG, JPEG, TIFF or DICOM X-ray.")
    else:
        show_result(upload.name, result, predictor)

st.header(f"Test metrics of {variant}")
table = metrics_table(variant, params)
if table is None:
    st.info(f"{variant} is not evaluated yet: run `dvc repro evaluate@{variant}`.")
else:
    st.markdown(table)
