/*
 * glmv web page: interface strings in English and Chinese.
 *
 * GlmvI18n.pick(saved) chooses the language (a saved choice, else navigator.language);
 * GlmvI18n.t(lang, key, vars) formats one string ("{name}" placeholders);
 * GlmvI18n.apply(lang, root) fills elements marked data-i18n / data-i18n-placeholder /
 * data-i18n-title / data-i18n-aria.
 */
'use strict';

(function (global) {
  const STRINGS = {
    en: {
      newChat: 'New chat',
      conversations: 'Conversations',
      noConversations: 'No conversations yet',
      settings: 'Settings',
      menu: 'Conversations',
      mode: 'Mode',
      modeChat: 'Chat',
      emptyTitle: 'What can I help with?',
      emptyBody: 'Ask a question, paste a screenshot, or drop images here.',
      placeholder: 'Ask anything or add images…',
      composerHint: 'Enter to send · Shift+Enter for a new line',
      attach: 'Attach images',
      send: 'Send',
      stop: 'Stop',
      thinking: 'Thinking',
      thinkingLive: 'Thinking…',
      thoughtFor: 'Thought for {s} s',
      thoughts: 'Thoughts',
      thinkingAlwaysOn: 'This model always thinks before it answers.',
      dismiss: 'Dismiss',
      dropHere: 'Drop images to attach',
      removeImage: 'Remove image',
      resized: 'downscaled from {w}×{h}',
      notImage: '{name} is not an image',
      imageUnreadable: 'The browser cannot read the image {name}',
      tooManyImages: 'At most {n} images per message',
      error: 'Error',
      stopped: 'Stopped',
      interrupted: 'Interrupted (the page was closed while the answer streamed)',
      regenerate: 'Regenerate',
      copy: 'Copy',
      copied: 'Copied',
      delete: 'Delete',
      confirmDelete: 'Delete?',
      imageMessage: 'Image',
      ttft: 'first token {s} s',
      tps: '{v} tokens/s',
      tokens: '{n} tokens',
      model: 'Model',
      systemPrompt: 'System prompt',
      temperature: 'Temperature',
      topP: 'Top-p',
      maxTokens: 'Max tokens',
      defaultHint: "Leave blank to use the server's defaults.",
      language: 'Language',
      done: 'Done',
      apiKey: 'API key',
      keyPrompt: 'This server needs an API key.',
      keyRejected: 'The API key was not accepted.',
      keyStored: 'The key is kept in this tab only (sessionStorage).',
      forgetKey: 'Forget the API key',
      keyForgotten: 'The API key was forgotten.',
      continue: 'Continue',
      cancel: 'Cancel',
      randomWeights: 'The model “{model}” has random weights: its answers are random text. Start glmv with --model DIR to serve a real checkpoint.',
      demoModel: '“{model}” is a small demo model trained on synthetic documents: it reads printed text on receipts, invoices, cards, tables and chat screenshots and answers questions about them. It is not a general assistant. Start glmv with --model DIR to serve a GLM-V checkpoint.',
      serverUnreachable: 'Cannot reach the server: {msg}',
      noModels: 'The server lists no models.',
      networkError: 'The connection failed: {msg}',
      storageFailed: 'Could not save conversations in this browser: {msg}',
      emptyAnswer: '(empty answer)',
      truncated: 'Stopped at the max tokens limit',
    },
    zh: {
      newChat: '新对话',
      conversations: '对话',
      noConversations: '还没有对话',
      settings: '设置',
      menu: '对话列表',
      mode: '模式',
      modeChat: '对话',
      emptyTitle: '有什么可以帮你？',
      emptyBody: '输入问题、粘贴截图，或把图片拖到这里。',
      placeholder: '输入问题，或添加图片…',
      composerHint: 'Enter 发送 · Shift+Enter 换行',
      attach: '添加图片',
      send: '发送',
      stop: '停止',
      thinking: '深度思考',
      thinkingLive: '思考中…',
      thoughtFor: '已思考 {s} 秒',
      thoughts: '思考过程',
      thinkingAlwaysOn: '此模型总是先思考再回答。',
      dismiss: '关闭',
      dropHere: '松开即可添加图片',
      removeImage: '移除图片',
      resized: '已从 {w}×{h} 缩小',
      notImage: '{name} 不是图片',
      imageUnreadable: '浏览器无法读取图片 {name}',
      tooManyImages: '每条消息最多 {n} 张图片',
      error: '错误',
      stopped: '已停止',
      interrupted: '已中断（回答生成时页面被关闭）',
      regenerate: '重新生成',
      copy: '复制',
      copied: '已复制',
      delete: '删除',
      confirmDelete: '确认删除？',
      imageMessage: '图片',
      ttft: '首字 {s} 秒',
      tps: '{v} tokens/秒',
      tokens: '{n} tokens',
      model: '模型',
      systemPrompt: '系统提示词',
      temperature: '温度',
      topP: 'Top-p',
      maxTokens: '最大 tokens',
      defaultHint: '留空则使用服务器默认值。',
      language: '语言',
      done: '完成',
      apiKey: 'API 密钥',
      keyPrompt: '此服务器需要 API 密钥。',
      keyRejected: 'API 密钥无效。',
      keyStored: '密钥只保存在当前标签页（sessionStorage）。',
      forgetKey: '清除 API 密钥',
      keyForgotten: 'API 密钥已清除。',
      continue: '继续',
      cancel: '取消',
      randomWeights: '模型“{model}”的权重是随机的：它的回答是随机文本。用 --model DIR 启动 glmv 以加载真实模型。',
      demoModel: '“{model}”是一个用合成文档训练的小型演示模型：它能读取小票、发票、证件、表格和聊天截图上的印刷文字并回答相关问题，不是通用助手。用 --model DIR 启动 glmv 以加载 GLM-V 模型。',
      serverUnreachable: '无法连接服务器：{msg}',
      noModels: '服务器没有列出任何模型。',
      networkError: '连接失败：{msg}',
      storageFailed: '无法在浏览器中保存对话：{msg}',
      emptyAnswer: '（空回答）',
      truncated: '已达到最大 tokens 限制',
    },
  };

  const LANGS = Object.keys(STRINGS);

  function pick(saved) {
    if (saved && LANGS.includes(saved)) return saved;
    const prefs = (navigator.languages && navigator.languages.length) ? navigator.languages : [navigator.language || 'en'];
    for (const pref of prefs) {
      const base = String(pref).toLowerCase().split('-')[0];
      if (LANGS.includes(base)) return base;
    }
    return 'en';
  }

  function t(lang, key, vars) {
    const table = STRINGS[lang] || STRINGS.en;
    let s = table[key];
    if (s === undefined) s = STRINGS.en[key];
    if (s === undefined) return key;
    if (vars) s = s.replace(/\{(\w+)\}/g, (m, name) => (name in vars ? String(vars[name]) : m));
    return s;
  }

  function apply(lang, root) {
    const scope = root || document;
    for (const node of scope.querySelectorAll('[data-i18n]')) node.textContent = t(lang, node.dataset.i18n);
    for (const node of scope.querySelectorAll('[data-i18n-placeholder]')) node.placeholder = t(lang, node.dataset.i18nPlaceholder);
    for (const node of scope.querySelectorAll('[data-i18n-title]')) node.title = t(lang, node.dataset.i18nTitle);
    for (const node of scope.querySelectorAll('[data-i18n-aria]')) node.setAttribute('aria-label', t(lang, node.dataset.i18nAria));
  }

  global.GlmvI18n = Object.freeze({ STRINGS, LANGS, pick, t, apply });
})(window);
