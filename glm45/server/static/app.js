// The glm45 web chat: one page that talks to this server's /v1/chat/completions with streaming.
//
// Safety rule: text from the model, from tool results and from the server goes into the page only as
// text nodes (textContent, append(string)). The Markdown renderer below builds elements itself; nothing
// is ever parsed as HTML, so `<script>` or `<img onerror>` in an answer is shown, not run.
'use strict';

// ------------------------------------------------------------------------------------------------
// DOM helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------------------------
// A small, safe Markdown renderer: fenced code, headings, lists, quotes, rules, paragraphs; inline
// code, bold, italics and links (http, https and mailto only).

const FENCE = /^\s*(```+|~~~+)\s*([\w+#.-]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s*>/;
const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,            // 1, 2: code
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source,                     // 3: bold
  /(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source,            // 4: bold
  /\*(?=[^\s*])([^*]*?[^\s*])\*/.source,                   // 5: italics
  /(?<!\w)_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/.source,        // 6: italics
  /\[([^\]\n]+)\]\(([^()\s]+)\)/.source,                   // 7, 8: link
  /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"])/.source,       // 9: bare URL
].join('|'));

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line);
}

function renderMarkdown(source) {
  const root = el('div', 'markdown');
  const lines = String(source).replace(/\r\n?/g, '\n').split('\n');
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {  // a fence still open while streaming runs to the end of the text
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) body.push(lines[i]);
      i++;
      root.append(codeBlock(body.join('\n'), m[2]));
    } else if (!line.trim()) {
      i++;
    } else if ((m = HEADING.exec(line))) {
      root.append(renderInline(el('h' + m[1].length), m[2]));
      i++;
    } else if (RULE.test(line)) {
      root.append(el('hr'));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) inner.push(lines[i].replace(/^\s*> ?/, ''));
      const quote = el('blockquote');
      quote.append(...renderMarkdown(inner.join('\n')).childNodes);
      root.append(quote);
    } else if ((m = LIST_ITEM.exec(line))) {
      const ordered = /\d/.test(m[1]);
      const list = el(ordered ? 'ol' : 'ul');
      if (ordered && parseInt(m[1], 10) !== 1) list.start = parseInt(m[1], 10);
      while (i < lines.length && (m = LIST_ITEM.exec(lines[i])) && /\d/.test(m[1]) === ordered) {
        const item = renderInline(el('li'), m[2]);
        for (i++; i < lines.length && /^\s{2,}\S/.test(lines[i]) && !LIST_ITEM.test(lines[i]); i++) {
          item.append(' ');
          renderInline(item, lines[i].trim());
        }
        list.append(item);
      }
      root.append(list);
    } else {
      const paragraph = el('p');
      do {
        if (paragraph.childNodes.length) paragraph.append(el('br'));
        renderInline(paragraph, lines[i++]);
      } while (i < lines.length && lines[i].trim() && !isBlockStart(lines[i]));
      root.append(paragraph);
    }
  }
  return root;
}

function renderInline(parent, text) {
  while (text) {
    const m = INLINE.exec(text);
    if (!m) {
      parent.append(text);
      break;
    }
    if (m.index) parent.append(text.slice(0, m.index));
    if (m[1]) parent.append(el('code', null, m[2]));
    else if (m[3] || m[4]) renderInline(parent.appendChild(el('strong')), m[3] || m[4]);
    else if (m[5] || m[6]) renderInline(parent.appendChild(el('em')), m[5] || m[6]);
    else if (m[7]) parent.append(link(m[7], m[8], m[0]));
    else parent.append(link(m[9], m[9], m[0]));
    text = text.slice(m.index + m[0].length);
  }
  return parent;
}

function link(label, url, original) {
  let parsed;
  try {
    parsed = new URL(url, location.href);
  } catch {
    return document.createTextNode(original);
  }
  if (!['http:', 'https:', 'mailto:'].includes(parsed.protocol)) return document.createTextNode(original);
  const a = el('a');
  a.href = parsed.href;
  a.target = '_blank';
  a.rel = 'noopener noreferrer';
  return renderInline(a, label);
}

function codeBlock(code, language) {
  const box = el('div', 'code');
  const head = el('div', 'code-head', language || 'text');
  const copy = el('button', 'copy', 'Copy');
  copy.type = 'button';
  copy.addEventListener('click', () => navigator.clipboard?.writeText(code).then(() => {
    copy.textContent = 'Copied';
    setTimeout(() => { copy.textContent = 'Copy'; }, 1200);
  }));
  head.append(copy);
  const pre = el('pre');
  pre.append(el('code', null, code));
  box.append(head, pre);
  return box;
}

// ------------------------------------------------------------------------------------------------
// The conversation: `turns` pairs each message sent to the server with its node on the page; error
// notes are turns without a message.

const state = {
  turns: [],          // {message: object|null, node: Element}
  controller: null,   // AbortController of the running request
  apiKey: sessionStorage.getItem('glm45.apiKey') || '',
};

function messages() {
  return state.turns.filter((t) => t.message).map((t) => t.message);
}

function addTurn(message, node) {
  state.turns.push({ message, node });
  $('conversation').append(node);
  node.scrollIntoView({ block: 'end' });
}

function showError(text) {
  addTurn(null, el('div', 'msg error', text));
  updateButtons();
}

function userNode(text) {
  const node = el('div', 'msg user');
  node.append(el('div', 'role', 'You'), el('div', 'text', text));
  return node;
}

function toolResultNode(call, content) {
  const node = el('div', 'msg tool');
  node.append(el('div', 'role', `Tool result · ${call.function.name}`), el('pre', 'text', content));
  return node;
}

function updateButtons() {
  const busy = state.controller !== null;
  $('send').disabled = busy;
  $('stop').disabled = !busy;
  $('regenerate').disabled = busy || !state.turns.some((t) => t.message && t.message.role !== 'assistant');
}

function send(text) {
  addTurn({ role: 'user', content: text }, userNode(text));
  return complete();
}

// Run the answer to the conversation so far again: drop everything after the last user or tool message.
function regenerate() {
  let last = state.turns.length - 1;
  while (last >= 0 && !(state.turns[last].message && state.turns[last].message.role !== 'assistant')) last--;
  if (last < 0) return;
  for (const turn of state.turns.splice(last + 1)) turn.node.remove();
  return complete();
}

function newChat() {
  if (state.controller) state.controller.abort();
  for (const turn of state.turns.splice(0)) turn.node.remove();
  updateButtons();
}

// ------------------------------------------------------------------------------------------------
// One answer: the request, the stream, and its rendering.

function readTools() {
  const text = $('tools').value.trim();
  if (!text) return null;
  let tools = JSON.parse(text);  // a SyntaxError names the problem; the caller shows it
  if (!Array.isArray(tools)) tools = [tools];
  return tools.length ? tools : null;
}

function requestBody() {
  const body = {
    messages: messages(),
    stream: true,
    stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: $('thinking').checked },
  };
  const temperature = parseFloat($('temperature').value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($('max-tokens').value, 10);
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  const tools = readTools();
  if (tools) body.tools = tools;
  return body;
}

class AnswerView {
  constructor() {
    this.node = el('div', 'msg assistant');
    this.node.append(el('div', 'role', 'Assistant'));
    this.thinking = null;
    this.content = el('div', 'content');
    this.calls = el('div', 'tool-calls');
    this.stats = el('div', 'stats');
    this.node.append(this.content, this.calls, this.stats);
    this.reasoning = '';
    this.text = '';
    this.toolCalls = [];  // OpenAI tool_calls, arguments accumulated as strings
    this.scheduled = false;
  }

  add(delta) {
    if (delta.reasoning_content) this.reasoning += delta.reasoning_content;
    if (delta.content) this.text += delta.content;
    for (const part of delta.tool_calls || []) {
      const call = this.toolCalls[part.index] ||= { id: '', type: 'function', function: { name: '', arguments: '' } };
      if (part.id) call.id = part.id;
      if (part.function?.name) call.function.name += part.function.name;
      if (part.function?.arguments) call.function.arguments += part.function.arguments;
    }
    if (!this.scheduled) {
      this.scheduled = true;
      requestAnimationFrame(() => { if (this.scheduled) this.render(); });  // not if rendered meanwhile
    }
  }

  render() {
    this.scheduled = false;
    if (this.reasoning && !this.thinking) {
      this.thinking = el('details', 'thinking');
      this.thinking.open = true;
      this.thinkingTitle = el('summary', null, 'Thinking…');
      this.thinkingText = el('div', 'thinking-text');
      this.thinking.append(this.thinkingTitle, this.thinkingText);
      this.content.before(this.thinking);
    }
    if (this.thinking) {
      this.thinkingText.textContent = this.reasoning;
      if ((this.text || this.toolCalls.length) && this.thinkingTitle.textContent === 'Thinking…') {
        this.thinkingTitle.textContent = 'Thought';
        this.thinking.open = false;  // collapsed once the answer starts; a click opens it again
      }
    }
    this.content.replaceChildren(renderMarkdown(this.text));
    this.calls.replaceChildren(...this.toolCalls.map(toolCallCard));
  }

  message() {
    const message = { role: 'assistant', content: this.text };
    if (this.reasoning) message.reasoning_content = this.reasoning;
    if (this.toolCalls.length) message.tool_calls = this.toolCalls;
    return message;
  }
}

function toolCallCard(call) {
  const card = el('div', 'tool-call');
  card.append(el('div', 'tool-label', 'Tool call'), el('div', 'tool-name', call.function.name || '…'));
  let args = call.function.arguments;
  try {
    args = JSON.stringify(JSON.parse(args), null, 2);
  } catch { /* still streaming, or not JSON: shown as it came */ }
  card.append(el('pre', 'tool-args', args));
  return card;
}

// Cards of a finished turn get a field per call; sending them adds the tool messages and asks again.
function addToolResultForm(view) {
  const form = el('form', 'tool-results');
  const fields = view.toolCalls.map((call, i) => {
    const field = el('textarea', 'tool-result');
    field.rows = 3;
    field.placeholder = `Result of ${call.function.name} (e.g. JSON)`;
    field.setAttribute('aria-label', `result of ${call.function.name}`);
    view.calls.children[i].append(field);
    return field;
  });
  const submit = el('button', null, 'Send tool results');
  submit.type = 'submit';
  form.append(submit);
  view.calls.after(form);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    if (state.controller) return;
    view.toolCalls.forEach((call, i) => {
      const content = fields[i].value;
      fields[i].readOnly = true;
      addTurn({ role: 'tool', tool_call_id: call.id, content }, toolResultNode(call, content));
    });
    form.remove();
    complete();
  });
}

function showStats(view, usage, finishReason, times) {
  const parts = [];
  if (usage) {
    const n = usage.completion_tokens;
    const decodeSeconds = (times.end - times.first) / 1000;
    const rate = n > 1 && decodeSeconds > 0 ? (n - 1) / decodeSeconds : n / ((times.end - times.start) / 1000);
    parts.push(`${n} tokens`, `${rate.toFixed(1)} tok/s`);
    const details = usage.completion_tokens_details;
    if (details && details.accepted_prediction_tokens !== undefined) {
      const accepted = details.accepted_prediction_tokens;
      const drafts = accepted + details.rejected_prediction_tokens;
      parts.push(drafts ? `MTP acceptance ${Math.round((100 * accepted) / drafts)}% (${accepted}/${drafts} drafts)`
        : 'MTP: no drafts');
    } else {
      parts.push('MTP off');
    }
  }
  if (finishReason === 'length') parts.push('cut off at max tokens');
  if (finishReason === 'stopped') parts.push('stopped');
  view.stats.textContent = parts.join(' · ');
}

async function complete() {
  let body;
  try {
    body = requestBody();
  } catch (e) {
    showError(`The tool definitions are not valid JSON: ${e.message}`);
    return;
  }
  const controller = new AbortController();
  state.controller = controller;
  updateButtons();
  const view = new AnswerView();
  const times = { start: performance.now(), first: null, end: null };
  let usage = null;
  let finishReason = null;
  let added = false;
  let failed = false;
  try {
    const headers = { 'Content-Type': 'application/json' };
    if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
    const response = await fetch('/v1/chat/completions', {
      method: 'POST', headers, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      await reportHttpError(response);
      return;
    }
    addTurn(null, view.node);
    added = true;
    for await (const chunk of events(response, controller.signal)) {
      if (chunk.error) throw new Error(`the server failed: ${chunk.error.message}`);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (times.first === null && (choice.delta.content || choice.delta.reasoning_content || choice.delta.tool_calls)) {
          times.first = performance.now();
        }
        view.add(choice.delta);
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === 'AbortError') {
      finishReason = 'stopped';
    } else {
      failed = true;
      showError(e instanceof TypeError ? `Could not reach the server: ${e.message}` : String(e.message || e));
    }
  } finally {
    state.controller = null;
    times.end = performance.now();
    if (times.first === null) times.first = times.end;
    const turn = added && state.turns.find((t) => t.node === view.node);
    if (turn) {
      if (finishReason === 'stopped' || failed) view.toolCalls = [];  // a call cut off half-way: no answer to it
      if (failed && !view.text && !view.reasoning) {
        state.turns.splice(state.turns.indexOf(turn), 1);
        view.node.remove();
      } else {
        view.render();
        turn.message = view.message();
        showStats(view, usage, finishReason, times);
        if (finishReason === 'tool_calls' && view.toolCalls.length) addToolResultForm(view);
      }
    }
    updateButtons();
  }
}

async function reportHttpError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const payload = await response.json();
    if (payload.error?.message) message = `${response.status}: ${payload.error.message}`;
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 401) {
    askForKey();
    message += ' Enter the API key under Settings, then press Regenerate.';
  }
  showError(`The server refused the request — ${message}`);
}

// Server-sent events of a chat completion stream, parsed.
async function* events(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
        if (!data) continue;
        if (data === '[DONE]') return;
        yield JSON.parse(data);
      }
    }
  } finally {
    if (signal.aborted) reader.cancel().catch(() => {});
  }
}

// ------------------------------------------------------------------------------------------------
// Settings, API key, start-up

function askForKey() {
  $('api-key-row').hidden = false;
  showSettings(true);
  $('api-key').focus();
}

function showSettings(show) {
  $('settings').hidden = !show;
  $('toggle-settings').setAttribute('aria-expanded', String(show));
}

const EXAMPLE_TOOLS = [{
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'Current weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
}];

async function loadModels() {
  const headers = state.apiKey ? { Authorization: `Bearer ${state.apiKey}` } : {};
  try {
    const response = await fetch('/v1/models', { headers });
    if (response.status === 401) {
      askForKey();
      return;
    }
    const models = await response.json();
    $('model-name').textContent = models.data.map((m) => `${m.id} · ${m.max_model_len} tokens`).join(', ');
  } catch { /* the first request will report it */ }
}

function init() {
  $('composer').addEventListener('submit', (event) => {
    event.preventDefault();
    const text = $('prompt').value.trim();
    if (!text || state.controller) return;
    $('prompt').value = '';
    send(text);
  });
  $('prompt').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $('composer').requestSubmit();
    }
  });
  $('stop').addEventListener('click', () => state.controller?.abort());
  $('regenerate').addEventListener('click', () => regenerate());
  $('new-chat').addEventListener('click', newChat);
  $('toggle-settings').addEventListener('click', () => showSettings($('settings').hidden));
  $('example-tool').addEventListener('click', () => { $('tools').value = JSON.stringify(EXAMPLE_TOOLS, null, 2); });
  $('api-key').value = state.apiKey;
  if (state.apiKey) $('api-key-row').hidden = false;
  $('api-key').addEventListener('input', () => {
    state.apiKey = $('api-key').value.trim();
    sessionStorage.setItem('glm45.apiKey', state.apiKey);
  });
  $('api-key').addEventListener('change', loadModels);
  updateButtons();
  loadModels();
}

init();
