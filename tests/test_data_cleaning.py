"""Cleaning keeps Chinese text as written: punctuation untouched, ads removed by their shape (lines, or
sentences of long lines, never documents), and a report whose character counts add up."""

import pytest

from tiny_llama2_zh.data.cleaning import AD_PATTERNS, AdFilter, Cleaner, CleaningOptions, load_ad_patterns

# Ad lines in the shapes web-novel sites publish them (several per shape, with the variants sites use to
# dodge filters: full-width letters, ideographic dots, brackets).
AD_LINES = [
    "天才一秒记住本站地址：www.biquge.info",
    "天才一秒记住『笔趣阁』，为您提供精彩小说阅读。",
    "（天才一秒记住本站地址：www.xbiquge.cc ）",
    "一秒记住【顶点小说网 www.23us.so】，精彩小说无弹窗免费阅读！",
    "手机用户请浏览 m.biquge.info 阅读，更优质的阅读体验。",
    "手机用户看《圣墟》请浏览 m.xs.com ，更优质的阅读体验。",
    "手机阅读本站地址：m.23us.so",
    "笔趣阁手机版阅读网址：m.biqugee.com",
    "最新章节请到 顶点小说 阅读",
    "看最新章节请上69书吧",
    "本书最新章节尽在纵横中文网",
    "请收藏本站：https://www.xbiquge.la。笔趣阁手机版：https://m.xbiquge.la",
    "请记住本书首发域名：biqugee.com。",
    "请大家记住本站域名：xs.la，谢谢支持！",
    "求推荐票！求月票！",
    "新书求收藏，求推荐票，拜托各位书友了！",
    "PS：今天三更，求订阅，求打赏！",
    "月底了，大家手里还有月票的，请投给本书吧，拜谢！",
    "本章未完，请点击下一页继续阅读》》",
    "（本章未完，请翻页）",
    "百度搜索 八一中文网 看最新章节",
    "百度搜索“书趣阁”第一时间阅读最新章节",
    "ｗｗｗ．ｂｉｑｕｇｅ．ｃｏｍ",
    "www。piaotian。com 飘天文学网",
    "http://www.piaotian.com/html/5/5466/",
    "喜欢剑来请大家收藏：(www.biqu.com)剑来笔趣阁更新速度最快。",
    "【推荐下，咪咪阅读追书真的好用，这里下载 www.mimiread.com 大家去快可以试试吧。】",
    "小说网友请提示:长时间阅读请注意眼睛的休息。",
    "为防止/百/度/转/码/无法阅读，请直接在浏览器中输入本站网址访问本站。",
    "退出转码页面，请下载爱阅小说app 阅读最新章节。",
    "章节错误,点此举报(免注册),举报后维护人员会在两分钟内校正章节内容,请耐心等待,并刷新页面。",
    "加入书签，方便阅读",
    "TXT全集下载请到 xiaoshuo.cc",
    "【看书福利】关注公众号【书友大本营】，每天看书抽现金/点币!",
    "本书由我的书城首发，更多精彩请访问我们的站点",
    "各位书友要是觉得《斗破苍穹》还不错的话请不要忘记向您QQ群和微博里的朋友推荐哦！",
    "【笔趣阁 www.biquge.com】第一时间更新《遮天》最新章节。",
    "起点中文网欢迎广大书友光临阅读，最新、最快、最火的连载作品尽在起点原创！",
    "(未完待续。如果您喜欢这部作品，欢迎您来起点（qidian.com）投推荐票、月票，您的支持，就是我最大的动力。)",
    "手机请访问：m.kanshu.la",
    "您可以在百度里搜索“遮天 笔趣阁”查找最新章节！",
    "本文首发于起点中文网，请支持正版阅读。",
    "各种网游小说、玄幻小说尽在全本小说网",
    "搜索关注公众号：书友之家，回复“剑来”即可免费阅读全文。",
    "最快更新小说阅读请访问",
    "一秒钟记住本站：顶点中文",
    "看小说到顶点中文网 23us。",  # no pattern takes this one: "看小说到" ends ordinary sentences too
]

# Ordinary prose holding the words a naive filter keys on: 手机用户, 最新, 推荐, 收藏, 网站, 记住, 下一页 ...
ORDINARY_LINES = [
    "９０％的手机用户认为通话质量至关重要。",
    "据调查，我国手机用户已经突破十亿。",
    "工作人员提醒手机用户注意防范电信诈骗。",
    "他掏出手机，翻看着最新的新闻推送。",
    "手机阅读正在成为年轻人获取信息的主要方式。",
    "这家公司发布了最新款的手机，售价三千元。",
    "软件更新后，手机的运行速度明显提升。",
    "记者从市政府获悉，最新的统计数据将于下周公布。",
    "这部小说的最新章节讲述了主人公回到故乡的经历。",
    "读者可以在图书馆查阅最新出版的期刊。",
    "各大新闻客户端中，这家的内容更新最快。",
    "老师向我们推荐了几本适合暑假阅读的书。",
    "经过层层推荐，他最终当选为县人大代表。",
    "这部电影获得了观众的一致推荐，票房节节攀升。",
    "月底前，他把所有的推荐信都寄了出去。",
    "博物馆收藏了大量珍贵的青铜器和书画作品。",
    "她把那封信收藏了整整三十年。",
    "他四处求收藏家帮忙鉴定这幅古画。",
    "请收藏好您的购物小票，以便日后退换。",
    "政府网站公布了今年的财政预算报告。",
    "这个网站的访问量在去年增长了三倍。",
    "记者登录该网站后发现，页面上没有任何联系方式。",
    "他把常用的网址都抄在了笔记本上。",
    "该公司上个月注册了新的域名。",
    "请记住这个地址：北京市海淀区中关村大街一号。",
    "同学们请翻到下一页继续阅读课文。",
    "本章讨论了线性代数的基本概念和方法。",
    "本章未完成的证明将在附录中给出。",
    "我用百度搜索了一下这个词的意思。",
    "代表们以无记名投票的方式选举了新一届领导班子。",
    "他每个月都要买一张公交月票。",
    "这款新车将在上海车展上全球首发。",
    "列车本站停车两分钟，请旅客们抓紧时间上下车。",
    "把文件另存为txt格式，然后发给我。",
    "他在一本杂志上读到了关于网络小说的报道。",
    "他周末喜欢在家看小说到深夜。",
    "该文首发于人民网，引起了广泛关注。",
    "各种新鲜水果尽在这家超市。",
]

CJK_PUNCTUATION = "，。、：；！？（）“”‘’《》【】…—"


def ad_filter() -> AdFilter:
    return AdFilter(load_ad_patterns(CleaningOptions()))


def fold(text: str) -> str:
    """text through the cleaner with every filter off: width folding and control characters only."""
    options = CleaningOptions(min_chars=0, min_chinese_ratio=0, remove_ads=False, exact_dedup=False, near_dedup=False)
    return Cleaner(options).clean(text)


def test_fixture_sizes():
    assert len(AD_LINES) >= 30 and len(ORDINARY_LINES) >= 30
    assert all(name for name in AD_PATTERNS)


def test_chinese_punctuation_survives_cleaning_byte_identical():
    line = f"他说{CJK_PUNCTUATION}然后离开了"
    assert fold(line).encode("utf-8") == line.encode("utf-8")
    assert fold("９０％的人，（大约）")  == "90％的人，（大约）"  # fmt: skip


def test_full_width_letters_digits_and_space_fold_and_are_counted():
    cleaner = Cleaner(CleaningOptions(min_chars=0, min_chinese_ratio=0, exact_dedup=False, near_dedup=False))
    assert cleaner.clean("ＡＢＣ１２３") == "ABC123"
    assert cleaner.clean("甲\u3000乙ｘｙｚ") == "甲 乙xyz"
    assert cleaner.report.characters_folded == 6 + 4
    assert "10 full-width characters folded" in cleaner.report.summary()


def test_ad_filter_recall_on_ad_lines_and_no_false_positives():
    ads = ad_filter()
    caught = [line for line in AD_LINES if ads.match(fold(line))]
    missed = sorted(set(AD_LINES) - set(caught))
    assert len(caught) / len(AD_LINES) >= 0.9, missed
    false_positives = [line for line in ORDINARY_LINES if ads.match(fold(line))]
    assert false_positives == []


def test_ordinary_news_line_with_trigger_words_is_kept():
    text = "据统计，９０％的手机用户认为通话质量至关重要。厂商纷纷推出最新机型，并向消费者推荐。"
    cleaner = Cleaner(CleaningOptions(near_dedup=False))
    assert cleaner.clean(text) == text.replace("９０", "90")
    assert "ads" not in cleaner.report.removed


def test_ads_are_removed_as_lines_and_counted_per_pattern():
    story = "少年推开了那扇尘封已久的木门，屋里弥漫着旧书的气味。"
    text = f"第一章 归来\n天才一秒记住本站地址：www.biquge.info\n{story}\n求推荐票！求月票！"
    cleaner = Cleaner(CleaningOptions(near_dedup=False))
    assert cleaner.clean(text) == f"第一章 归来\n{story}"
    assert cleaner.report.ad_removals == {"remember the site": 1, "votes": 1}
    removed = len("天才一秒记住本站地址：www.biquge.info\n") + len("\n求推荐票！求月票！")
    assert cleaner.report.removed["ads"].characters == removed and cleaner.report.removed["ads"].documents == 0


def test_a_long_single_line_document_loses_only_its_ad_sentence():
    # a 2 MB single-line document (as some corpora ship a whole book) with one ad sentence in the middle
    sentence = "夜色渐深，少年推开了那扇尘封已久的木门。"
    half = sentence * (1_000_000 // len(sentence.encode("utf-8")))
    ad = "最新章节请到顶点小说阅读！"
    text = half + ad + half
    assert len(text.encode("utf-8")) > 1_900_000
    cleaner = Cleaner(CleaningOptions(near_dedup=False, max_repeated_line_fraction=1.0, max_char_run=10**9))
    assert cleaner.clean(text) == half + half
    assert cleaner.report.removed["ads"].characters == len(ad)
    assert sum(cleaner.report.ad_removals.values()) == 1 and cleaner.report.documents_out == 1


def test_character_counts_add_up():
    documents = [
        "ＡＢＣ　全角字母和数字１２３应当折叠成半角，这是一段足够长的中文文本。",
        "  <p>网页残留的标签&amp;实体应当被清理掉，留下干净的中文正文内容。</p>\x00  ",
        "第一章\n请收藏本站：www.example.com\n少年推开了那扇尘封已久的木门，屋里弥漫着旧书的气味。",
        "太短了",
        "This document is written almost entirely in English, 只有几个汉字.",
        "重复的一行文字在这里出现\n" * 5 + "最后一行",
        "ＡＢＣ　全角字母和数字１２３应当折叠成半角，这是一段足够长的中文文本。",  # exact duplicate once folded
    ]
    cleaner = Cleaner(CleaningOptions(near_dedup=False))
    kept = list(cleaner.clean_all(documents))
    report = cleaner.report
    assert report.characters_in == sum(len(d) for d in documents)
    assert report.characters_out == sum(len(d) for d in kept)
    assert report.characters_in - report.characters_removed == report.characters_out
    assert report.removed["exact duplicate"].documents == 1 and report.removed["surrounding whitespace"].characters


def test_an_invalid_extra_ad_pattern_is_named(tmp_path):
    path = tmp_path / "ads.txt"
    path.write_text("# mine\n广告位招租\n(unclosed\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ads.txt:3 .*not a valid regular expression"):
        load_ad_patterns(CleaningOptions(extra_ad_patterns_file=str(path)))
    path.write_text("广告位招租\n", encoding="utf-8")
    cleaner = Cleaner(CleaningOptions(extra_ad_patterns_file=str(path), near_dedup=False))
    assert cleaner.clean("少年推开了那扇尘封已久的木门，屋里弥漫着旧书的气味。\n广告位招租") is not None
    assert cleaner.report.ad_removals == {"ads.txt:1": 1}
