"""A small calibration set made on the spot: synthetic images and Chinese/English text.

AWQ-style scaling needs typical activations of each linear layer, not a dataset: a few dozen
prompts that look like what users send (a document or chart image and a question, a plain text
question, the answer turn) exercise both the text and the image paths of the model. The images
are drawn with Pillow (gradients, shapes, bar charts, lines of text, noise) and the prompts go
through the checkpoint's own tokenizer, chat template and image processor — the same code that
serves requests — so nothing is downloaded and the same seed gives the same set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

# (question, answer) pairs in both languages, about the kinds of image users send.
_DIALOGUES: tuple[tuple[str, str], ...] = (
    ("What is the total amount on this invoice?", "The invoice total is 1,284.50 USD, due on 15 March."),
    ("这张发票的总金额是多少？", "发票总金额为人民币3,560.00元，开票日期为2024年5月8日。"),
    (
        "Describe the chart.",
        "The bar chart compares quarterly revenue; Q3 is the highest at about 42 million.",
    ),
    ("请描述这张图表的主要趋势。", "图表显示销售额从一月到六月持续上升，五月增长最快，六月略有回落。"),
    (
        "Is there anything unsafe in this picture?",
        "No. The image shows geometric shapes and text on a plain background.",
    ),
    ("图片里有哪些文字？", "图片中写着：会议时间下午三点，地点二号会议室，请准时参加。"),
    (
        "Extract the fields as JSON.",
        '{"name": "Li Wei", "date": "2024-06-01", "amount": 99.9, "currency": "CNY"}',
    ),
    ("把表格内容整理成JSON。", '{"产品": "笔记本", "数量": 12, "单价": 8.5, "合计": 102}'),
    ("How many circles are there?", "There are four circles: two red, one blue and one green."),
    ("这张截图是什么应用的界面？", "这是一个设置页面的截图，左侧是菜单，右侧是账户信息和通知选项。"),
    ("Summarise the document in one sentence.", "The memo asks every team to submit its budget by Friday."),
    ("用一句话总结这段内容。", "这份通知提醒员工在周五之前提交年度预算。"),
)

# Text-only turns (no image): general questions, code, reasoning.
_TEXT_ONLY: tuple[tuple[str, str], ...] = (
    (
        "Explain what a KV cache is in two sentences.",
        "It stores the keys and values of past tokens so each new token attends without recomputing them. This trades memory for speed.",
    ),
    ("写一个Python函数计算列表的平均值。", "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0"),
    (
        "What is 17 * 23? Think step by step.",
        "<think>17 * 20 = 340, 17 * 3 = 51, so 391.</think><answer>391</answer>",
    ),
    (
        "北京和上海哪个城市人口更多？",
        "<think>根据近年的统计数据比较两个城市。</think><answer>上海的常住人口略多于北京。</answer>",
    ),
    ("Translate to Chinese: The meeting is moved to Thursday.", "会议改到星期四。"),
    ("Translate to English: 请把文件发到我的邮箱。", "Please send the file to my email."),
)

_WORDS = (
    "Invoice",
    "Total",
    "Date",
    "Amount",
    "发票",
    "金额",
    "合计",
    "日期",
    "Revenue",
    "Q1",
    "Q2",
    "Q3",
    "Name",
    "地址",
    "电话",
    "Report",
    "2024",
    "No. 0042",
    "¥ 3,560.00",
    "$ 1,284.50",
)


@dataclass(slots=True)
class CalibrationImage:
    """One preprocessed image placed in a prompt (satisfies `glmv.models.base.PromptImage`)."""

    pixel_values: torch.Tensor  # [t*h*w, patch_dim] float32
    grid_thw: tuple[int, int, int]
    offset: int  # first image token of the image in the prompt


@dataclass(slots=True)
class CalibrationSample:
    token_ids: list[int]
    images: list[CalibrationImage]


def synthetic_image(rng: random.Random, width: int, height: int) -> Image.Image:
    """A document-, chart- or photo-like picture drawn from `rng`."""
    kind = rng.choice(("document", "chart", "shapes", "photo"))
    base = (
        tuple(rng.randint(200, 255) for _ in range(3))
        if kind == "document"
        else tuple(rng.randint(0, 255) for _ in range(3))
    )
    img = Image.new("RGB", (width, height), base)
    draw = ImageDraw.Draw(img)
    if kind == "photo":
        nprng = np.random.default_rng(rng.randint(0, 2**31))
        yy, xx = np.mgrid[0:height, 0:width]
        c = np.stack(
            [np.sin(xx / rng.uniform(8, 60) + i) * np.cos(yy / rng.uniform(8, 60)) for i in range(3)], axis=-1
        )
        arr = ((c * 0.5 + 0.5) * 200 + nprng.normal(0, 12, c.shape)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
    if kind == "chart":
        bars = rng.randint(3, 8)
        bw = width // (bars * 2 + 1)
        for i in range(bars):
            h = rng.randint(height // 8, height - 20)
            color = tuple(rng.randint(0, 255) for _ in range(3))
            draw.rectangle((bw * (2 * i + 1), height - h, bw * (2 * i + 2), height - 10), fill=color)
        draw.line((5, height - 10, width - 5, height - 10), fill=(0, 0, 0), width=2)
    if kind in ("shapes", "photo"):
        for _ in range(rng.randint(2, 7)):
            x0, y0 = rng.randint(0, width - 10), rng.randint(0, height - 10)
            x1, y1 = x0 + rng.randint(5, width // 2), y0 + rng.randint(5, height // 2)
            color = tuple(rng.randint(0, 255) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), outline=color, width=3)
    if kind in ("document", "chart"):
        for line in range(rng.randint(3, 10)):
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 5)))
            draw.text((10, 10 + 14 * line), text, fill=(0, 0, 0))
    return img


def _messages(question: str, answer: str, with_image: bool) -> list[dict[str, Any]]:
    content: Any = [{"type": "image"}, {"type": "text", "text": question}] if with_image else question
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def build_calibration_set(
    checkpoint: str | Path,
    *,
    num_samples: int = 16,
    max_tokens: int = 512,
    seed: int = 0,
    image_sides: tuple[int, int] = (112, 448),
) -> list[CalibrationSample]:
    """`num_samples` tokenized conversations (about three in four with one synthetic image),
    each at most `max_tokens` long, built with the checkpoint's own tokenizer, chat template and
    image processor."""
    from glmv.processing.chat import ChatProcessor
    from glmv.processing.image import ImageProcessor
    from glmv.processing.tokenizer import Tokenizer

    path = Path(checkpoint)
    tokenizer = Tokenizer.from_pretrained(path)
    chat = ChatProcessor(tokenizer)
    images = ImageProcessor.from_pretrained(path)
    rng = random.Random(seed)
    samples: list[CalibrationSample] = []
    index = 0
    while len(samples) < num_samples:
        with_image = index % 4 != 3
        pool = _DIALOGUES if with_image else _TEXT_ONLY
        question, answer = pool[rng.randrange(len(pool))]
        index += 1
        processed = []
        if with_image:
            w, h = rng.randint(*image_sides), rng.randint(*image_sides)
            processed.append(images.preprocess(synthetic_image(rng, w, h)))
        prompt = chat.encode(
            _messages(question, answer, with_image),
            [p.num_tokens for p in processed],
            [p.content_hash for p in processed],
            add_generation_prompt=False,
        )
        if len(prompt.token_ids) > max_tokens:
            if processed:  # an image that does not fit: try a smaller one next time
                continue
            prompt.token_ids = prompt.token_ids[:max_tokens]
        placed = [
            CalibrationImage(p.pixel_values, p.grid_thw, span.offset)
            for p, span in zip(processed, prompt.image_spans, strict=True)
        ]
        samples.append(CalibrationSample(prompt.token_ids, placed))
    return samples


def random_calibration_set(
    vocab_size: int, *, num_samples: int = 16, length: int = 256, seed: int = 0
) -> list[CalibrationSample]:
    """Text-only samples of random token ids, for checkpoints without a tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    return [
        CalibrationSample(torch.randint(0, vocab_size, (length,), generator=gen).tolist(), [])
        for _ in range(num_samples)
    ]
