"""Word pools of the document generator: shops, goods, companies, people, places, messages.

Kept small on purpose: a small model learns to read a bounded set of characters well rather than
every character badly. Prices are (low, high) in cents.
"""

from __future__ import annotations

import random

__all__ = [
    "EN_FIRST",
    "EN_LAST",
    "company_zh",
    "en_item",
    "en_merchant",
    "invoice_item",
    "person_zh",
    "zh_address",
    "zh_item",
    "zh_merchant",
]

EN_ADJ = (
    "Blue",
    "Green",
    "Golden",
    "Silver",
    "Sunny",
    "Happy",
    "Urban",
    "Corner",
    "Royal",
    "Fresh",
    "Little",
    "Big",
    "Red",
    "Lucky",
    "Maple",
    "Ocean",
    "River",
    "Star",
    "Moon",
    "Harbor",
    "North",
    "Old Town",
    "Daily",
    "Bright",
)
EN_NOUN = (
    "Bottle",
    "Leaf",
    "Bean",
    "Oak",
    "Bridge",
    "Garden",
    "Table",
    "Kitchen",
    "Street",
    "Lane",
    "Bay",
    "Hill",
    "Tree",
    "Fox",
    "Bear",
    "Spoon",
    "Basket",
    "Corner",
    "Field",
    "Stone",
)
EN_TYPE = (
    "Coffee",
    "Cafe",
    "Bakery",
    "Market",
    "Grocery",
    "Deli",
    "Pharmacy",
    "Books",
    "Diner",
    "Pizza",
    "Noodles",
    "Store",
    "Mart",
    "Bistro",
    "Tea House",
    "Foods",
    "Kitchen",
    "Burgers",
)

EN_ITEMS: tuple[tuple[str, int, int], ...] = (
    ("Latte", 350, 650),
    ("Cappuccino", 350, 650),
    ("Americano", 250, 500),
    ("Espresso", 200, 400),
    ("Green Tea", 250, 500),
    ("Hot Chocolate", 300, 550),
    ("Croissant", 250, 450),
    ("Bagel", 200, 400),
    ("Muffin", 250, 450),
    ("Sandwich", 550, 1100),
    ("Caesar Salad", 750, 1400),
    ("Soup of the Day", 450, 850),
    ("Cheeseburger", 650, 1300),
    ("French Fries", 250, 550),
    ("Chicken Wrap", 650, 1150),
    ("Margherita Pizza", 900, 1800),
    ("Pasta", 900, 1900),
    ("Orange Juice", 300, 600),
    ("Sparkling Water", 150, 350),
    ("Cola", 150, 350),
    ("Bottled Water", 100, 250),
    ("Milk 1L", 150, 350),
    ("Eggs 12pk", 250, 550),
    ("Bread", 200, 500),
    ("Butter", 250, 550),
    ("Cheddar Cheese", 350, 750),
    ("Bananas", 100, 300),
    ("Apples", 200, 600),
    ("Tomatoes", 150, 450),
    ("Rice 2kg", 300, 800),
    ("Olive Oil", 600, 1400),
    ("Coffee Beans", 900, 1800),
    ("Chocolate Bar", 100, 350),
    ("Potato Chips", 150, 400),
    ("Yogurt", 100, 300),
    ("Toothpaste", 200, 500),
    ("Shampoo", 400, 900),
    ("Paper Towels", 300, 800),
    ("Notebook", 200, 600),
    ("Ballpoint Pens", 150, 500),
    ("AA Batteries", 400, 900),
    ("USB Cable", 500, 1500),
    ("Phone Case", 900, 2500),
    ("Paperback Novel", 800, 1800),
    ("Greeting Card", 200, 600),
    ("Vitamin C", 600, 1500),
    ("Pain Relief", 500, 1200),
    ("Hand Cream", 400, 1100),
    ("Sushi Roll", 600, 1400),
    ("Ramen", 900, 1600),
    ("Fried Rice", 700, 1300),
    ("Dumplings", 600, 1200),
    ("Iced Tea", 200, 450),
    ("Cookie", 150, 350),
    ("Brownie", 250, 450),
    ("Pancakes", 600, 1100),
    ("Omelette", 650, 1200),
)

ZH_MERCHANT_BRAND = (
    "全家",
    "罗森",
    "美宜佳",
    "便利蜂",
    "永辉",
    "华联",
    "盒马",
    "喜茶",
    "瑞幸",
    "老乡鸡",
    "沙县",
    "兰州",
    "西贝",
    "味千",
    "大润发",
    "物美",
    "京客隆",
    "好利来",
    "鲜丰",
    "百果园",
    "海天",
    "金鼎",
    "如家",
    "和记",
    "新华",
    "同仁堂",
    "一点点",
    "蜜雪",
)
ZH_MERCHANT_TYPE = (
    "便利店",
    "超市",
    "咖啡",
    "餐厅",
    "面馆",
    "药房",
    "书店",
    "烘焙",
    "水果店",
    "茶饮",
    "小吃",
    "快餐",
    "生鲜",
)
ZH_BRANCH = (
    "国贸店",
    "中关村店",
    "南京路店",
    "天河店",
    "西湖店",
    "春熙路店",
    "望京店",
    "徐家汇店",
    "人民广场店",
    "五道口店",
    "科技园店",
    "火车站店",
)

ZH_ITEMS: tuple[tuple[str, int, int], ...] = (
    ("拿铁", 1500, 3800),
    ("美式咖啡", 1200, 3200),
    ("卡布奇诺", 1500, 3800),
    ("奶茶", 800, 2200),
    ("柠檬茶", 800, 1800),
    ("牛角包", 600, 1500),
    ("三明治", 900, 2200),
    ("饭团", 500, 1200),
    ("矿泉水", 150, 400),
    ("可乐", 250, 600),
    ("橙汁", 500, 1200),
    ("牛奶", 400, 1200),
    ("酸奶", 500, 1200),
    ("面包", 500, 1500),
    ("鸡蛋", 800, 2000),
    ("苹果", 600, 1800),
    ("香蕉", 400, 1200),
    ("西瓜", 1500, 3500),
    ("薯片", 500, 1200),
    ("方便面", 400, 1200),
    ("巧克力", 800, 2500),
    ("饼干", 500, 1500),
    ("牛肉面", 1500, 3500),
    ("宫保鸡丁", 2500, 4800),
    ("鱼香肉丝", 2200, 4200),
    ("米饭", 200, 500),
    ("水饺", 1500, 3200),
    ("小笼包", 1200, 2800),
    ("炒饭", 1500, 2800),
    ("麻辣烫", 1800, 3500),
    ("红烧肉", 3000, 6800),
    ("番茄炒蛋", 1500, 2800),
    ("青菜", 800, 1800),
    ("豆浆", 300, 800),
    ("油条", 200, 500),
    ("大米", 2500, 6500),
    ("食用油", 3500, 8500),
    ("洗发水", 2500, 6800),
    ("牙膏", 800, 2500),
    ("纸巾", 600, 2500),
    ("感冒灵", 1200, 3500),
    ("维生素C", 2500, 6800),
    ("笔记本", 300, 1500),
    ("签字笔", 200, 800),
    ("雨伞", 2500, 6500),
    ("充电线", 1500, 4500),
)

ZH_CITIES = (
    "北京",
    "上海",
    "广州",
    "深圳",
    "杭州",
    "南京",
    "成都",
    "武汉",
    "西安",
    "苏州",
    "天津",
    "重庆",
    "长沙",
    "青岛",
    "厦门",
    "合肥",
)
ZH_DISTRICTS = (
    "朝阳区",
    "海淀区",
    "东城区",
    "浦东新区",
    "徐汇区",
    "天河区",
    "南山区",
    "西湖区",
    "鼓楼区",
    "武侯区",
    "江汉区",
    "雁塔区",
    "姑苏区",
    "和平区",
    "渝中区",
    "岳麓区",
)
ZH_ROADS = (
    "人民路",
    "建设路",
    "解放路",
    "中山路",
    "和平路",
    "世纪大道",
    "科技路",
    "长江路",
    "黄河路",
    "新华路",
    "光明街",
    "学院路",
    "花园路",
    "文化路",
    "东风路",
    "胜利街",
)
ZH_BRAND_NAMES = (
    "星辰",
    "明月",
    "华信",
    "恒通",
    "博远",
    "鼎盛",
    "瑞丰",
    "金桥",
    "天宇",
    "正泰",
    "新海",
    "云帆",
    "嘉禾",
    "锦程",
    "宏达",
    "远航",
    "同创",
    "汇通",
    "中科",
    "立信",
    "盛世",
    "长城",
    "东方",
    "卓越",
    "蓝天",
    "青松",
    "宇航",
    "安信",
)
ZH_INDUSTRIES = (
    "科技",
    "贸易",
    "商贸",
    "信息技术",
    "电子",
    "文化传媒",
    "餐饮管理",
    "物流",
    "建筑工程",
    "医药",
    "网络科技",
    "咨询",
    "实业",
    "食品",
    "教育科技",
)
ZH_COMPANY_FORMS = ("有限公司", "有限公司", "有限公司", "股份有限公司")

ZH_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林高罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁任沈"
)
ZH_GIVEN = (
    "伟",
    "芳",
    "娜",
    "敏",
    "静",
    "丽",
    "强",
    "磊",
    "军",
    "洋",
    "勇",
    "艳",
    "杰",
    "娟",
    "涛",
    "明",
    "超",
    "秀英",
    "华",
    "平",
    "刚",
    "桂英",
    "建华",
    "文",
    "晨",
    "宇",
    "浩",
    "欣怡",
    "子涵",
    "雨桐",
    "俊杰",
    "思远",
    "佳琪",
    "志强",
    "海燕",
    "晓东",
    "丹",
    "鹏",
    "婷",
    "雪",
    "琳",
    "斌",
    "凯",
    "博",
)

EN_FIRST = (
    "James",
    "Mary",
    "John",
    "Linda",
    "David",
    "Sarah",
    "Michael",
    "Emma",
    "Daniel",
    "Olivia",
    "Robert",
    "Sophia",
    "William",
    "Grace",
    "Thomas",
    "Emily",
    "Chris",
    "Anna",
    "Kevin",
    "Lucy",
    "Wei",
    "Li",
    "Ming",
    "Jun",
)
EN_LAST = (
    "Smith",
    "Johnson",
    "Brown",
    "Taylor",
    "Miller",
    "Wilson",
    "Moore",
    "Clark",
    "Lewis",
    "Walker",
    "Hall",
    "Young",
    "King",
    "Wright",
    "Green",
    "Baker",
    "Adams",
    "Turner",
    "Chen",
    "Wang",
    "Zhang",
    "Liu",
    "Lee",
    "Martin",
)

INVOICE_ITEMS: tuple[tuple[str, str, str, int, int], ...] = (
    # (category, name, unit, low, high) - unit price in cents
    ("办公用品", "签字笔", "盒", 1500, 6000),
    ("办公用品", "打印纸", "箱", 12000, 30000),
    ("办公用品", "文件夹", "个", 500, 3000),
    ("计算机外部设备", "扫描仪", "台", 80000, 350000),
    ("计算机外部设备", "键盘", "个", 5000, 40000),
    ("计算机外部设备", "显示器", "台", 60000, 250000),
    ("餐饮服务", "餐费", "次", 10000, 300000),
    ("住宿服务", "住宿费", "天", 20000, 90000),
    ("信息技术服务", "技术服务费", "项", 100000, 5000000),
    ("信息技术服务", "软件维护费", "年", 200000, 3000000),
    ("运输服务", "运输费", "次", 20000, 500000),
    ("电子元件", "电阻", "包", 1000, 8000),
    ("电子元件", "电容", "包", 1000, 8000),
    ("纸制品", "纸巾", "箱", 5000, 20000),
    ("日用杂品", "清洁用品", "批", 10000, 80000),
    ("咨询服务", "咨询费", "项", 100000, 2000000),
    ("印刷品", "宣传册", "本", 300, 3000),
    ("家具", "办公椅", "把", 30000, 150000),
    ("家具", "办公桌", "张", 60000, 300000),
    ("建筑服务", "工程款", "项", 500000, 9000000),
    ("食品", "矿泉水", "箱", 2000, 6000),
    ("劳务", "培训费", "次", 50000, 1500000),
)
INVOICE_MODELS = ("A4", "70g", "DS-530", "K120", "P2422H", "M3", "0.5mm", "500ml", "标准", "XL", "G502", "B5")


def en_merchant(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{rng.choice(EN_ADJ)} {rng.choice(EN_NOUN)} {rng.choice(EN_TYPE)}"
    return f"{rng.choice(EN_ADJ)} {rng.choice(EN_TYPE)}"


def zh_merchant(rng: random.Random) -> str:
    name = rng.choice(ZH_MERCHANT_BRAND) + rng.choice(ZH_MERCHANT_TYPE)
    if rng.random() < 0.5:
        name += f"（{rng.choice(ZH_BRANCH)}）"
    return name


def en_item(rng: random.Random) -> tuple[str, int]:
    name, low, high = rng.choice(EN_ITEMS)
    return name, rng.randint(low // 5, high // 5) * 5


def zh_item(rng: random.Random) -> tuple[str, int]:
    name, low, high = rng.choice(ZH_ITEMS)
    return name, rng.randint(low // 10, high // 10) * 10


def company_zh(rng: random.Random) -> str:
    return (
        rng.choice(ZH_CITIES)
        + rng.choice(ZH_BRAND_NAMES)
        + rng.choice(ZH_INDUSTRIES)
        + rng.choice(ZH_COMPANY_FORMS)
    )


def person_zh(rng: random.Random) -> str:
    return rng.choice(ZH_SURNAMES) + rng.choice(ZH_GIVEN)


def zh_address(rng: random.Random, city: str | None = None) -> str:
    city = city or rng.choice(ZH_CITIES)
    return f"{city}市{rng.choice(ZH_DISTRICTS)}{rng.choice(ZH_ROADS)}{rng.randint(1, 300)}号"


def invoice_item(rng: random.Random) -> tuple[str, str | None, str, int]:
    """(name as printed, model or None, unit, unit price in cents)."""
    category, name, unit, low, high = rng.choice(INVOICE_ITEMS)
    model = rng.choice(INVOICE_MODELS) if rng.random() < 0.4 else None
    return (
        f"*{category}*{name}",
        model,
        unit,
        rng.randint(low // 100, high // 100) * 100 + rng.choice((0, 0, 50)),
    )
