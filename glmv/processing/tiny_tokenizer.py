"""Builder of the real (small) byte-level BPE tokenizer shipped with the tiny GLM-V checkpoint.

The embedded default model and the test suite need a tokenizer that behaves like GLM's: a
byte-level BPE with GLM-4's pre-tokenizer regex, the GLM special tokens as single added tokens in
GLM's order, a chat template, and files that both glmv and `transformers.AutoTokenizer` load.
`write_tiny_tokenizer` trains such a tokenizer deterministically on a small built-in English and
Chinese corpus and writes it into a checkpoint directory.

The two token layouts mirror the published checkpoints:

* ``glm41v`` (GLM-4.1V-9B-Thinking): sixteen special tokens ending in ``<|image|>``/``<|video|>``,
  then ``<think>``/``</think>``/``<answer>``/``</answer>`` as ordinary added tokens (they survive
  ``skip_special_tokens``) and ``<|begin_of_box|>``/``<|end_of_box|>`` as special ones.
* ``glm46v`` (GLM-4.5V / GLM-4.6V style): the thirty-six special tokens of that family, tool and
  thinking tags included, with ``<|image|>``/``<|video|>`` last.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "GLM41V_ADDED_TOKENS",
    "GLM46V_ADDED_TOKENS",
    "GLM_PRETOKENIZE_REGEX",
    "TEMPLATE_NAMES",
    "TinyTokenizerInfo",
    "builtin_template",
    "write_tiny_tokenizer",
]

# The split regex of GLM-4's tokenizer.json (the cl100k pattern).
GLM_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The 14 special tokens every GLM-4 family tokenizer starts its added tokens with, in id order.
GLM_CORE_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

# (content, special) in id order, appended after the BPE vocabulary.
GLM41V_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *((token, True) for token in GLM_CORE_SPECIAL_TOKENS),
    ("<|image|>", True),
    ("<|video|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<answer>", False),
    ("</answer>", False),
    ("<|begin_of_box|>", True),
    ("<|end_of_box|>", True),
)

GLM46V_ADDED_TOKENS: tuple[tuple[str, bool], ...] = tuple(
    (token, True)
    for token in (
        *GLM_CORE_SPECIAL_TOKENS,
        "<|begin_of_audio|>",
        "<|end_of_audio|>",
        "<|begin_of_transcription|>",
        "<|end_of_transcription|>",
        "<|code_prefix|>",
        "<|code_middle|>",
        "<|code_suffix|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
        "/nothink",
        "<|begin_of_box|>",
        "<|end_of_box|>",
        "<|image|>",
        "<|video|>",
    )
)

_LAYOUTS: dict[str, tuple[tuple[str, bool], ...]] = {
    "glm41v": GLM41V_ADDED_TOKENS,
    "glm46v": GLM46V_ADDED_TOKENS,
}
# How many leading added tokens the published tokenizer_config lists as additional special tokens.
_LISTED_SPECIALS: dict[str, int] = {"glm41v": 16, "glm46v": len(GLM46V_ADDED_TOKENS)}
_MODEL_MAX_LENGTH: dict[str, int] = {"glm41v": 65536, "glm46v": 131072}

TEMPLATE_NAMES: tuple[str, ...] = tuple(_LAYOUTS)

DEFAULT_VOCAB_SIZE = 2000

# A few KB of invoices, receipts, chart descriptions and chat snippets in English and Chinese.
_CORPUS = """\
INVOICE No. INV-2024-0117
Date: 2024-03-15    Due date: 2024-04-14
Bill to: Northwind Trading Ltd., 42 Harbour Road, Singapore 018989
Ship to: Contoso Retail, 7 Market Street, London EC2V 6DN
Item                     Qty    Unit price    Amount
Office chair (black)      4       $129.00     $516.00
Standing desk 140x70      2       $349.50     $699.00
USB-C docking station     6        $89.99     $539.94
Subtotal: $1,754.94   Tax (8%): $140.40   Total: $1,895.34
Payment terms: Net 30. Please pay by bank transfer to account 0123-456789.
Thank you for your business!
RECEIPT - Blue Bottle Coffee #118, 2024-05-02 08:41
1 x Latte (large)        5.50
2 x Croissant            7.00
1 x Sparkling water      2.25
TOTAL                   14.75   VISA ****4821
The bar chart shows quarterly revenue for 2023: Q1 $1.2M, Q2 $1.5M, Q3 $1.4M and Q4 $2.1M.
Revenue grew 75% from the first quarter to the fourth quarter, with the largest jump in Q4.
The line chart compares the monthly temperature in Beijing and Shanghai. In July the average
temperature is 31 degrees in Beijing and 33 degrees in Shanghai; in January it is -3 and 6.
The pie chart: mobile 58%, desktop 35%, tablet 7%. Mobile traffic is the majority.
User: What is the total amount on this invoice?
Assistant: The total amount due is $1,895.34, including $140.40 of tax.
User: Extract the vendor name, date and total as JSON.
Assistant: {"vendor": "Northwind Trading Ltd.", "date": "2024-03-15", "total": 1895.34}
User: Describe the image.
Assistant: A red bus is parked in front of a brick building. Two people are waiting at the stop.
User: Is there anything unsafe in this picture?
Assistant: No. The image shows a kitchen with a kettle, two cups and a bowl of fruit on the table.
User: Read the text in the screenshot and summarise it in one sentence.
Assistant: The screenshot is a login page that asks for an email address and a password.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
Please find the attached report. Let me know if you have any questions.
{"name": "Alice", "age": 30, "items": [1, 2, 3], "paid": true, "note": null}
def total(items): return sum(item.price * item.qty for item in items)
增值税专用发票  发票代码：044031900111  发票号码：12345678
开票日期：2024年03月15日
购买方名称：北京星辰科技有限公司  纳税人识别号：91110108MA01XXXX
销售方名称：上海明月贸易有限公司  地址：上海市浦东新区世纪大道100号
货物名称        数量    单价      金额
办公椅           4      129.00    516.00
升降桌           2      349.50    699.00
扩展坞           6       89.99    539.94
合计金额：1754.94元  税额：140.40元  价税合计（大写）：壹仟捌佰玖拾伍元叁角肆分
收款人：张伟  复核：李娜  开票人：王芳
小票 星巴克咖啡 北京国贸店 2024-05-02 08:41
拿铁（大杯） 1 杯 35.00 元
牛角包 2 个 28.00 元
合计：63.00 元 支付方式：微信支付
柱状图显示了2023年各季度的销售额：第一季度120万元，第二季度150万元，第三季度140万元，第四季度210万元。
从第一季度到第四季度，销售额增长了75%，第四季度增幅最大。
折线图比较了北京和上海的月平均气温。七月北京平均气温31度，上海33度；一月北京零下3度，上海6度。
饼图：移动端占58%，桌面端占35%，平板占7%，移动端流量占多数。
用户：这张发票的总金额是多少？
助手：价税合计为1895.34元，其中税额为140.40元。
用户：请把销售方名称、开票日期和总金额提取成JSON。
助手：{"销售方": "上海明月贸易有限公司", "日期": "2024-03-15", "总金额": 1895.34}
用户：描述一下这张图片。
助手：图片中一辆红色公交车停在一栋砖砌建筑前，两个人在车站等车。
用户：这张图片里有不安全的内容吗？
助手：没有。图片显示的是一个厨房，桌子上有一个水壶、两个杯子和一碗水果。
用户：请阅读截图中的文字，并用一句话总结。
助手：截图是一个登录页面，要求输入电子邮箱和密码。
你好，世界！今天天气很好，我们去公园散步吧。谢谢你的帮助，祝你工作顺利。
请在下午三点前把报告发给我。如果有任何问题，请随时联系我。
图中的表格列出了三家公司的名称、成立时间和员工人数。
Mixed text: 订单号 Order #A-1029 于 2024/06/01 发货，预计 3-5 个工作日送达 (ETA: June 5).
价格 Price: ¥199.00 / $27.50 / €25.40   数量 Qty: 12   折扣 Discount: 15%
Emoji: 🙂 👍 🚌 ☕ 📈 ✅ — ok!
BANK STATEMENT  Account: 6222 0200 1234 5678   Period: 01/04/2024 - 30/04/2024
04/02  Salary payment           +8,500.00   Balance 12,430.18
04/09  Electricity bill           -212.35   Balance 12,217.83
04/21  Grocery store              -318.90   Balance 11,898.93
SHIPPING LABEL  From: Shenzhen Warehouse B3  To: Berlin, Germany  Weight: 2.4 kg  Tracking: SF1029384756
| Country | Population (million) | GDP growth |
| China   | 1,410                | 5.2%       |
| Germany | 84                   | -0.3%      |
Q: Which product had the highest sales in March? A: The wireless headphones, with 1,240 units sold.
Q: How many people are in the photo? A: There are three people: two adults and a child holding a kite.
The scatter plot suggests a positive correlation between study hours and exam scores.
银行对账单 账户：6222 0200 1234 5678 期间：2024年4月1日至4月30日
4月2日 工资收入 +8500.00元 余额 12430.18元
4月9日 电费 -212.35元 余额 12217.83元
快递单 寄件人：深圳仓库B3 收件人：德国柏林 重量：2.4公斤 运单号：SF1029384756
问：三月份哪种产品销量最高？答：无线耳机，共售出1240台。
问：照片里有几个人？答：有三个人，两个大人和一个拿着风筝的孩子。
散点图表明学习时间与考试成绩之间存在正相关关系。
这是一份合同的第一页，甲方为北京星辰科技有限公司，乙方为上海明月贸易有限公司，合同金额为人民币五十万元整。
"""


@dataclass(slots=True)
class TinyTokenizerInfo:
    """What `write_tiny_tokenizer` wrote.

    `special_ids` holds the ids a GLM-V `config.json` needs: ``image_token_id``,
    ``video_token_id``, ``image_start_token_id``, ``image_end_token_id``,
    ``video_start_token_id``, ``video_end_token_id``, ``pad_token_id`` (ints) and
    ``eos_token_ids`` (the ids of ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``).
    `added_tokens` maps every added token's text to its id.
    """

    vocab_size: int
    special_ids: dict[str, Any]
    added_tokens: dict[str, int] = field(default_factory=dict)
    template: str = "glm41v"


def builtin_template(name: str) -> str:
    """The text of a chat template shipped with glmv (``glm41v`` or ``glm46v``)."""
    if name not in _LAYOUTS:
        raise ValueError(f"unknown chat template {name!r}; expected one of {', '.join(TEMPLATE_NAMES)}")
    return resources.files("glmv.processing").joinpath("templates", f"{name}.jinja").read_text("utf-8")


def _corpus_lines(seed: int) -> list[str]:
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    # Keep the line breaks: the pre-tokenizer has dedicated newline pieces worth learning.
    return [line + "\n" for line in lines]


def _train_bpe(
    seed: int,
    vocab_size: int,
    corpus: Iterable[str] | None = None,
    split_regex: str = GLM_PRETOKENIZE_REGEX,
    max_token_length: int = 12,
) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        max_token_length=max_token_length,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = _corpus_lines(seed) if corpus is None else corpus
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def _added_token(content: str, special: bool) -> AddedToken:
    return AddedToken(
        content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
    )


def write_tiny_tokenizer(
    out_dir: Path,
    *,
    template: str = "glm41v",
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    corpus: Iterable[str] | None = None,
    split_regex: str = GLM_PRETOKENIZE_REGEX,
    max_token_length: int = 12,
) -> TinyTokenizerInfo:
    """Train the tiny BPE and write ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json`` and ``chat_template.jinja`` into `out_dir`.

    The same arguments always produce byte-identical files. `template` picks both the chat
    template and the added-token layout (``glm41v`` or ``glm46v``). `seed` orders the training
    lines; BPE counts pairs over the whole corpus, so in practice every seed gives the same merges.
    `corpus` replaces the built-in training text and `split_regex` the GLM-4 pre-tokenizer split
    (the demo model's tokenizer uses both: its own documents, and one digit per token).
    """
    if template not in _LAYOUTS:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATE_NAMES)}")
    layout = _LAYOUTS[template]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_bpe(seed, vocab_size, corpus, split_regex, max_token_length)
    base_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for content, special in layout:
        if special:
            tokenizer.add_special_tokens([_added_token(content, True)])
        else:
            tokenizer.add_tokens([_added_token(content, False)])
    added = {content: base_size + index for index, (content, _) in enumerate(layout)}
    for content, token_id in added.items():
        if tokenizer.token_to_id(content) != token_id:  # pragma: no cover - guards the layout invariant
            raise RuntimeError(
                f"added token {content!r} got id {tokenizer.token_to_id(content)}, expected {token_id}"
            )
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)

    listed = [content for content, _ in layout[: _LISTED_SPECIALS[template]]]
    added_tokens_decoder = {
        str(added[content]): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in layout
    }
    tokenizer_config: dict[str, Any] = {
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": listed,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": _MODEL_MAX_LENGTH[template],
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_tokens_map = {
        "additional_special_tokens": listed,
        "eos_token": _token_map_entry("<|endoftext|>"),
        "pad_token": _token_map_entry("<|endoftext|>"),
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map)
    (out_dir / "chat_template.jinja").write_text(builtin_template(template), encoding="utf-8")

    special_ids: dict[str, Any] = {
        "image_token_id": added["<|image|>"],
        "video_token_id": added["<|video|>"],
        "image_start_token_id": added["<|begin_of_image|>"],
        "image_end_token_id": added["<|end_of_image|>"],
        "video_start_token_id": added["<|begin_of_video|>"],
        "video_end_token_id": added["<|end_of_video|>"],
        "eos_token_ids": [added["<|endoftext|>"], added["<|user|>"], added["<|observation|>"]],
        "pad_token_id": added["<|endoftext|>"],
    }
    return TinyTokenizerInfo(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        special_ids=special_ids,
        added_tokens=added,
        template=template,
    )


def _token_map_entry(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
